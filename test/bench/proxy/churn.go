package main

// The churn section (issue 19): with the host guard on in the simulated node, a steady
// concealed client in the victim pod measures its latency idle, then while exposed
// pods' state records are added and deleted (--churn-rate of each per second), as the
// CNI plugin's ADD and DEL write and remove them. Each change wakes the proxy's pod
// index (inotify), which re-applies the attestation rules (one iptables-restore).

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// churnRounds is how many idle and churned phases alternate.
const churnRounds = 3

// churnInNode runs the churn section in the node; the victim is an attested pod.
func churnInNode(b *benchNode, self string, vict *benchPod, fc floodConfig) error {
	if fc.churnPods < 1 || fc.churnPods > 40 {
		return fmt.Errorf("--churn-pods %d: want 1..40", fc.churnPods)
	}
	base, err := b.attestedRules()
	if err != nil {
		return err
	}
	var pods []*benchPod
	for i := range fc.churnPods {
		p := &benchPod{ns: "kube-system", name: fmt.Sprintf("exposed%02d", i), id: fmt.Sprintf("exposed%06d", i),
			ip: fmt.Sprintf("10.89.0.%d", 200+i), hostIf: fmt.Sprintf("mcbx%02d", i)}
		if err := b.addPod(p, "-"); err != nil { // its record comes and goes below
			return err
		}
		pods = append(pods, p)
	}
	// Every pod exposed once: the rules for all of them apply (their interfaces resolve).
	for _, p := range pods {
		if err := b.writeRecord(p, "excludeNamespaces"); err != nil {
			return err
		}
	}
	if err := b.waitAttested(base + len(pods)); err != nil {
		return fmt.Errorf("exposed pods: %w", err)
	}
	for _, p := range pods {
		if err := state.Remove(b.stateDir, p.id, "eth0"); err != nil {
			return err
		}
	}
	if err := b.waitAttested(base); err != nil {
		return fmt.Errorf("exposed pods removed: %w", err)
	}

	loadavg, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("\nchurn: pod victim/app (%s, concealed, attested) measures while %d exposed pods' state records are added and deleted, %d adds and %d deletes a second; host guard on\n",
		victimIP, len(pods), fc.churnRate, fc.churnRate)
	fmt.Printf("  load average before: %s", loadavg)
	fmt.Printf("  victim: GET %s at %d req/s over 4 keep-alive connections, %d rounds of an idle phase then a churned one, %s each\n", victimPath, fc.victimRPS, churnRounds, fc.duration)
	if _, err := runVictim(self, vict, fc.victimRPS, time.Second); err != nil { // warm-up
		return fmt.Errorf("victim warm-up: %w", err)
	}
	// Idle and churned phases alternate (churnRounds of each), so that the shared
	// machine's load falls on both alike; the p99s are over all phases of a kind.
	var (
		idle, churned = &result{}, &result{}
		adds, dels    atomic.Int64
		churnTime     time.Duration
		firstErr      error
		mu            sync.Mutex
		seen          = map[int]int{} // exposed pods' rules sampled once a second -> samples
		present       = make([]bool, len(pods))
		ratios        []string
		cpuIdle       [2]float64 // proxy, its children (iptables-restore): ticks
		cpuChurn      [2]float64
		idleTime      time.Duration
		churnMeasured time.Duration
	)
	pid := b.mc.cmd.Process.Pid
	cpu := func() [2]float64 {
		u, s, c := cpuTicksAll(pid)
		return [2]float64{float64(u + s), float64(c)}
	}
	interval := time.Second / time.Duration(2*fc.churnRate)
	for round := range churnRounds {
		c0, t0 := cpu(), time.Now()
		r, err := runVictim(self, vict, fc.victimRPS, fc.duration)
		if err != nil {
			return fmt.Errorf("victim, idle (round %d): %w", round+1, err)
		}
		c1 := cpu()
		idleTime += time.Since(t0)
		cpuIdle[0], cpuIdle[1] = cpuIdle[0]+c1[0]-c0[0], cpuIdle[1]+c1[1]-c0[1]
		idle.merge(r)
		ri99 := r.percentile(99)

		// The churn: every interval one pod's record is written if absent or removed
		// if present, round robin, so adds and deletes each run at churnRate a second.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			next := time.Now()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Until(next)):
				}
				next = next.Add(interval)
				k := j % len(pods)
				var err error
				if present[k] {
					err = state.Remove(b.stateDir, pods[k].id, "eth0")
					dels.Add(1)
				} else {
					err = b.writeRecord(pods[k], "excludeNamespaces")
					adds.Add(1)
				}
				present[k] = !present[k]
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		}()
		go func() { // proof that the rules follow the records: what the chain holds
			defer wg.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
				}
				if n, err := b.attestedRules(); err == nil {
					mu.Lock()
					seen[n-base]++
					mu.Unlock()
				}
			}
		}()
		t0 = time.Now()
		time.Sleep(time.Second) // let the churn run before measuring
		c0, t1 := cpu(), time.Now()
		r, verr := runVictim(self, vict, fc.victimRPS, fc.duration)
		c1 = cpu()
		churnMeasured += time.Since(t1)
		cpuChurn[0], cpuChurn[1] = cpuChurn[0]+c1[0]-c0[0], cpuChurn[1]+c1[1]-c0[1]
		close(stop)
		wg.Wait()
		churnTime += time.Since(t0)
		if verr != nil {
			return fmt.Errorf("victim, under churn (round %d): %w", round+1, verr)
		}
		if firstErr != nil {
			return fmt.Errorf("churning the records: %w", firstErr)
		}
		churned.merge(r)
		ratios = append(ratios, fmt.Sprintf("%.2fx", float64(r.percentile(99))/float64(ri99)))
	}
	for k, p := range pods {
		if present[k] {
			if err := state.Remove(b.stateDir, p.id, "eth0"); err != nil {
				return err
			}
		}
	}
	settle := time.Now()
	if err := b.waitAttested(base); err != nil {
		return fmt.Errorf("after the churn: %w", err)
	}

	ip50, ip99 := idle.percentile(50), idle.percentile(99)
	cp50, cp99 := churned.percentile(50), churned.percentile(99)
	fmt.Printf("  records: %d added, %d deleted in %s of churn (%.1f adds/s, %.1f deletes/s); exposed pods' attestation rules, sampled once a second: %v (rules: samples); back to none %s after the last change\n",
		adds.Load(), dels.Load(), churnTime.Round(100*time.Millisecond), float64(adds.Load())/churnTime.Seconds(), float64(dels.Load())/churnTime.Seconds(),
		seen, time.Since(settle).Round(10*time.Millisecond))
	fmt.Printf("  victim idle:        %d answers, %d not 200, p50 %s p99 %s\n", idle.requests, idle.errors, fmtDur(ip50), fmtDur(ip99))
	fmt.Printf("  victim under churn: %d answers, %d not 200, p50 %s p99 %s  (p99 %.2fx idle; must be <= 2x)\n",
		churned.requests, churned.errors, fmtDur(cp50), fmtDur(cp99), float64(cp99)/float64(ip99))
	share := func(ticks float64, d time.Duration) float64 { return 100 * ticks / clockTicks / d.Seconds() }
	fmt.Printf("  proxy CPU, idle phases: %.0f%% of one core, its iptables-restore children %.0f%%; churned phases: %.0f%%, children %.0f%%\n",
		share(cpuIdle[0], idleTime), share(cpuIdle[1], idleTime), share(cpuChurn[0], churnMeasured), share(cpuChurn[1], churnMeasured))
	fmt.Printf("  per round (churned p99 / idle p99 of the phase before): %s\n", strings.Join(ratios, ", "))
	return nil
}
