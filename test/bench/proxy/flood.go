package main

// The flood bench: one pod floods the proxy (thousands of distinct long polls plus
// requests as fast as it can send them) while another pod measures its latency, first
// with the node idle, then under the flood. It runs as on a node (node.go): a
// simulated node netns holds the fake metadata server on 169.254.169.254 and
// metaconceal-proxy with its defaults, host guard on (its DNAT of pods' metadata
// traffic, its per-source connection limit); the flooder and the victim are pods,
// each a netns on the node's bridge with its own veth, named by state records in the
// proxy's --state-dir exactly as the CNI plugin writes them, and each a process of
// its own (this binary re-executed with `ip netns exec`). Nothing touches the
// machine's own netns.
//
// The same node then serves the exposed-pod churn (churn.go) and the worst-case fill
// (worstCaseInNode): every pod is attested by the host guard, as on a node.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

var proxyDefaults = proxy.DefaultLimits

const (
	// The pods' addresses on the simulated node's bridge (node.go).
	flooderIP = "10.89.0.2"
	victimIP  = "10.89.0.3"
	// daemonSetMemoryLimitMiB is the proxy container's memory limit in
	// conf/deploy/daemonset.yaml; daemonSetNoFile the descriptor limit it runs with.
	daemonSetMemoryLimitMiB = 384
	daemonSetNoFile         = 20000
	victimPath              = "/computeMetadata/v1/instance/attributes/cluster-name"
)

type floodConfig struct {
	polls     int           // the flooder's long poll loops
	hammers   int           // the flooder's request loops (keep-alive, back to back)
	duration  time.Duration // each measured phase
	victimRPS int           // the victim's paced request rate
	nice      int           // the flooder's nice level: a pod's CPU is its cgroup's share, not the node's
	worstPods int           // pods of the worst-case fill (0 skips it)
	churnRate int           // exposed pods' records added (and as many deleted) per second in the churn section (0 skips it)
	churnPods int           // exposed pods whose records the churn adds and deletes
}

// floodStats is what the flooder reports (JSON on stdout).
type floodStats struct {
	Requests      int64            `json:"requests"`
	Status        map[string]int64 `json:"status"`
	ConnErrors    int64            `json:"connErrors"`
	PollsHeldPeak int64            `json:"pollsHeldPeak"`
	FirstError    string           `json:"firstError,omitempty"`
}

// printFlood prints the flood's figures.
func printFlood(idle, flooded *result, fs floodStats, p proxyUsage, refused string) {
	ip50, ip99 := idle.percentile(50), idle.percentile(99)
	fp50, fp99 := flooded.percentile(50), flooded.percentile(99)
	fmt.Printf("  victim idle:        %d answers, %d not 200, p50 %s p99 %s\n", idle.requests, idle.errors, fmtDur(ip50), fmtDur(ip99))
	fmt.Printf("  victim under flood: %d answers, %d not 200, p50 %s p99 %s  (p99 %.2fx idle; must be <= 2x)\n",
		flooded.requests, flooded.errors, fmtDur(fp50), fmtDur(fp99), float64(fp99)/float64(ip99))
	var codes []string
	for _, c := range []string{"200", "429", "503", "other"} {
		if n := fs.Status[c]; n > 0 || c == "429" {
			codes = append(codes, fmt.Sprintf("%s: %d", c, n))
		}
	}
	fmt.Printf("  flooder: %d requests answered (%s), %d connection errors, at most %d long polls in flight at once\n",
		fs.Requests, strings.Join(codes, ", "), fs.ConnErrors, fs.PollsHeldPeak)
	if fs.FirstError != "" {
		fmt.Printf("  flooder's first connection error: %s\n", fs.FirstError)
	}
	fmt.Printf("  proxy: peak RSS %.1f MiB (DaemonSet limit %d MiB), open descriptors %d / %d during the flood (limit %d), CPU %.0f%% of one core during the flood (user %.0f%%, system %.0f%%)\n",
		float64(p.peakRSSKiB)/1024, daemonSetMemoryLimitMiB, p.fdsBefore, p.fdsAfter, daemonSetNoFile, 100*(p.user+p.sys), 100*p.user, 100*p.sys)
	fmt.Printf("  proxy metric %s\n", refused)
}

// proxyUsage is what the proxy used during the flood.
type proxyUsage struct {
	peakRSSKiB          int
	fdsBefore, fdsAfter int
	user, sys           float64 // share of one core
}

// etagIn is the victim path's current ETag, asked from inside the pod netns at nsPath.
func etagIn(nsPath, path string) (string, error) {
	c := &client{addr: podTarget, req: request(path), dial: simnode.DialContextIn(nsPath)}
	defer c.close()
	return currentETag(c)
}

// victim sends GETs from the victim pod's address at rps over 4 keep-alive
// connections for d; every answer that is not a 200 counts as an error.
func victim(addr, src string, rps int, d time.Duration) (*result, error) {
	const conns = 4
	interval := time.Duration(conns) * time.Second / time.Duration(rps)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total = &result{}
		first error
	)
	start := time.Now()
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &client{addr: addr, req: request(victimPath), src: src}
			defer c.close()
			r := &result{}
			next := start.Add(time.Duration(i) * interval / conns)
			for time.Since(start) < d {
				time.Sleep(time.Until(next))
				next = next.Add(interval)
				t0 := time.Now()
				status, err := c.do()
				if err != nil || status != http.StatusOK {
					r.errors++
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("status %d: %v", status, err)
					}
					mu.Unlock()
					continue
				}
				r.latencies = append(r.latencies, time.Since(t0))
				r.requests++
			}
			mu.Lock()
			total.merge(r)
			mu.Unlock()
		}()
	}
	wg.Wait()
	total.elapsed = time.Since(start)
	if total.requests == 0 {
		return nil, fmt.Errorf("no answer at all: %v", first)
	}
	return total, nil
}

func openFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

// scrapeAllWith is scrapeAll through c (a client whose connections are made in the
// node netns, for the proxy in the simulated node).
func scrapeAllWith(c *http.Client, addr, name string) string {
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return name + " ?"
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, name) && !strings.HasSuffix(l, " 0") {
			out = append(out, strings.TrimPrefix(l, name))
		}
	}
	if len(out) == 0 {
		return name + " (none)"
	}
	return name + " " + strings.Join(out, " ")
}

// flooder is the re-executed flooding pod: it prints floodStats as JSON. Started as
// "flood victim ...", it is the measuring pod instead (victimMain).
func flooder(args []string) int {
	if len(args) > 0 && args[0] == "victim" {
		return victimMain(args[1:])
	}
	fs := flag.NewFlagSet("flood", flag.ContinueOnError)
	addr := fs.String("addr", "", "proxy host:port")
	src := fs.String("src", "", "source address (empty: the netns's own)")
	polls := fs.Int("polls", 3000, "long poll loops")
	hammers := fs.Int("hammers", 64, "request loops")
	etag := fs.String("etag", "", "current ETag of the polled attribute")
	d := fs.Duration("duration", 10*time.Second, "how long to flood")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var (
		stop       atomic.Bool
		wg         sync.WaitGroup
		requests   atomic.Int64
		connErrs   atomic.Int64
		held, peak atomic.Int64
		mu         sync.Mutex
		status     = map[string]int64{}
		firstErr   string
	)
	count := func(code int, err error) {
		if err != nil {
			connErrs.Add(1)
			mu.Lock()
			if firstErr == "" {
				firstErr = err.Error()
			}
			mu.Unlock()
			return
		}
		requests.Add(1)
		key := strconv.Itoa(code)
		if code != 200 && code != 429 && code != 503 {
			key = "other"
		}
		mu.Lock()
		status[key]++
		mu.Unlock()
	}
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	if *src != "" {
		dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(*src)}
	}
	// Requests as fast as it can, ignoring Retry-After. These loops connect first, as
	// an attacker would: once a keep-alive connection is open, no connection limit
	// slows its requests down, while the poll loops' re-dials spend the pod's
	// connection burst at the host guard.
	var connected sync.WaitGroup
	connected.Add(*hammers)
	for i := range *hammers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			first := true
			paths := []string{"/computeMetadata/v1/project/project-id", victimPath,
				"/computeMetadata/v1/instance/attributes/kube-env", fmt.Sprintf("/computeMetadata/v1/instance/attributes/x%d", i)}
			c := &client{addr: *addr, src: *src}
			defer c.close()
			for j := 0; !stop.Load(); j++ {
				c.req = request(paths[j%len(paths)])
				code, err := c.do()
				count(code, err)
				if first {
					first = false
					connected.Done()
				}
				if errors.Is(err, syscall.EADDRNOTAVAIL) {
					time.Sleep(10 * time.Millisecond)
				}
			}
		}()
	}
	waitTimeout(&connected, 2*time.Second)
	// Distinct long polls: each loop its own timeout_sec, so none coalesce.
	for i := range *polls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := request(fmt.Sprintf("%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", victimPath, *etag, 60+i%3000))
			for !stop.Load() {
				conn, err := dialer.Dial("tcp", *addr)
				if err != nil {
					count(0, err)
					if errors.Is(err, syscall.EADDRNOTAVAIL) {
						time.Sleep(10 * time.Millisecond) // out of local ports: the flooder's own limit
					}
					continue
				}
				_ = conn.SetDeadline(time.Now().Add(*d))
				if _, err := conn.Write(req); err != nil {
					conn.Close()
					count(0, err)
					continue
				}
				n := held.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				code, err := readResponse(bufio.NewReaderSize(conn, 1024))
				held.Add(-1)
				conn.Close()
				if err != nil && (stop.Load() || errors.Is(err, os.ErrDeadlineExceeded)) {
					return
				}
				count(code, err)
			}
		}()
	}
	time.Sleep(*d)
	stop.Store(true)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	mu.Lock()
	out, _ := json.Marshal(floodStats{Requests: requests.Load(), Status: status, ConnErrors: connErrs.Load(), PollsHeldPeak: peak.Load(), FirstError: firstErr})
	mu.Unlock()
	fmt.Println(string(out))
	return 0
}

// waitTimeout waits for wg at most d.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// worstCaseInNode fills the proxy as far as its default limits let every pod go at
// once: pods attested pods join the node (netns on the bridge, state records), and
// each, from inside its own netns, opens its connection cap, half of them holding
// distinct long polls (up to the pod's long poll cap) and half idle after one request.
// It reports what the proxy holds then: resident memory, descriptors, long polls,
// refusals.
func worstCaseInNode(b *benchNode, pods int) error {
	if pods > 240 {
		return fmt.Errorf("--worst-case-pods %d: at most 240 fit the node's /24", pods)
	}
	l := defaultLimits()
	before, err := b.attestedRules()
	if err != nil {
		return err
	}
	var ps []*benchPod
	t0 := time.Now()
	for i := range pods {
		p := &benchPod{ns: "worst", name: fmt.Sprintf("pod%03d", i), id: fmt.Sprintf("worst%06d", i),
			ip: fmt.Sprintf("10.89.0.%d", 10+i), hostIf: fmt.Sprintf("mcbw%03d", i)}
		if err := b.addPod(p, ""); err != nil {
			return err
		}
		ps = append(ps, p)
	}
	if err := b.waitAttested(before + pods); err != nil {
		return err
	}
	attest0, err := b.attestCounters()
	if err != nil {
		return err
	}
	loadavg, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("\nworst case: %d pods at once, each at its caps (%d connections: %d distinct long polls held, the rest idle after one request)\n",
		pods, l.podConns, l.podPolls)
	fmt.Printf("  %d attested pods on bridge %s of the simulated node (netns, state records; ready and attested in %s), each dialing from its own netns; load average before: %s",
		pods, nodeBridge, time.Since(t0).Round(100*time.Millisecond), loadavg)
	etag, err := etagIn(ps[0].netnsPath, victimPath)
	if err != nil {
		return fmt.Errorf("ETag from pod %s: %w", ps[0].name, err)
	}
	var (
		mu       sync.Mutex
		conns    []net.Conn
		statuses = map[int]int{}
		failed   int
		firstErr error
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		failed++
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	sem := make(chan struct{}, 256)
	start := time.Now()
	for pi, p := range ps {
		dial := simnode.DialContextIn(p.netnsPath) // each socket made in the pod's netns
		for i := range l.podConns {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				conn, err := dial(ctx, "tcp", podTarget)
				cancel()
				if err != nil {
					fail(err)
					return
				}
				mu.Lock()
				conns = append(conns, conn)
				mu.Unlock()
				if i < l.podPolls {
					_, _ = conn.Write(request(fmt.Sprintf("%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", victimPath, etag, 60+(pi*l.podPolls+i)%3541)))
					return // held (timeout_sec 60..3600, distinct): answered after this measurement
				}
				_, _ = conn.Write(request(victimPath))
				_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				status, err := readResponse(bufio.NewReader(conn))
				if err != nil {
					fail(err)
					return
				}
				mu.Lock()
				statuses[status]++
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	opened := time.Since(start)
	time.Sleep(2 * time.Second) // let the proxy settle on what it holds
	mc, metrics := b.mc, b.metrics
	rss := currentRSS(mc.cmd.Process.Pid)
	peak, _ := mc.peakRSS()
	fds := openFDs(mc.cmd.Process.Pid)
	attest1, err := b.attestCounters()
	if err != nil {
		return err
	}
	var attested int64
	for _, p := range ps {
		attested += attest1[p.ip] - attest0[p.ip]
	}
	fmt.Printf("  opened %d connections in %s (%d failed); idle connections' answers: %v; %d new connections attested by the kernel (nat METACONCEAL-ATTEST counters)\n",
		len(conns), opened.Round(time.Millisecond), failed, statuses, attested)
	if firstErr != nil {
		fmt.Printf("  first failure: %v\n", firstErr)
	}
	fmt.Printf("  proxy holds: %s client long polls on %s upstream long polls; %s client connections\n",
		scrapeGaugeWith(metrics, nodeMetrics, "metaconceal_proxy_long_polls_open"), scrapeGaugeWith(metrics, nodeMetrics, "metaconceal_proxy_upstream_long_polls_open"),
		scrapeGaugeWith(metrics, nodeMetrics, "metaconceal_proxy_client_connections_open"))
	fmt.Printf("  proxy: RSS %.1f MiB now, peak %.1f MiB (DaemonSet limit %d MiB); %d open descriptors (limit %d)\n",
		float64(rss)/1024, float64(peak)/1024, daemonSetMemoryLimitMiB, fds, daemonSetNoFile)
	fmt.Printf("  proxy metric %s\n", scrapeAllWith(metrics, nodeMetrics, "metaconceal_proxy_refused_requests_total"))
	for _, c := range conns {
		c.Close()
	}
	return nil
}

type benchLimits struct{ podConns, podPolls int }

// defaultLimits are metaconceal-proxy's defaults (the same variable its flags use).
func defaultLimits() benchLimits {
	return benchLimits{podConns: proxyDefaults.PodMaxConns, podPolls: proxyDefaults.PodMaxLongPolls}
}

func currentRSS(pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for l := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times (100 on Linux).
const clockTicks = 100

// cpuTicks is the process's user and system CPU time in clock ticks.
func cpuTicks(pid int) (int64, int64) {
	u, s, _ := cpuTicksAll(pid)
	return u, s
}

// cpuTicksAll is the process's user and system CPU time and its waited-for children's
// (user plus system), in clock ticks.
func cpuTicksAll(pid int) (int64, int64, int64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, 0
	}
	// Fields after the command (which may hold spaces) start after the last ')'.
	rest := string(data[strings.LastIndexByte(string(data), ')')+2:])
	f := strings.Fields(rest)
	if len(f) < 15 {
		return 0, 0, 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	cutime, _ := strconv.ParseInt(f[13], 10, 64)
	cstime, _ := strconv.ParseInt(f[14], 10, 64)
	return utime, stime, cutime + cstime
}
