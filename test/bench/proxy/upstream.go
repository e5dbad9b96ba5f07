package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// upstreamBench measures metaconceal-proxy's path to the upstream with the cache off,
// beside a bare httputil.ReverseProxy, at each concurrency: with cold keys (each
// connection asks for a token with scopes of its own, so no request is answered from
// the cache or shares a flight), then with every connection asking for project-id
// (identical concurrent requests share one upstream request). (It compared net/http's Transport with
// the hand-written pool side by side when the pool was kept: docs/figures.md.)
func upstreamBench(cfg benchConfig, upstream, bare *process) error {
	off := []string{"--cache=false", "--pod-rate=0", "--pod-max-conns=0", "--pod-max-long-polls=0",
		"--max-upstream-long-polls=0", "--max-upstream-conns=0"}
	mc, _, stop, err := startProxy("metaconceal-proxy (cache off)", "http://"+upstream.addr, off...)
	if err != nil {
		return err
	}
	defer stop()
	coldKey := func(i int) string {
		return fmt.Sprintf("/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/bench-%d", i)
	}
	if err := upstreamRounds(cfg, bare, mc, "cold keys (a token with scopes of its own per connection)", coldKey); err != nil {
		return err
	}
	return upstreamRounds(cfg, bare, mc, "one key (project-id on every connection)", func(int) string { return path })
}

// path is the throughput benchmark's request path.
const path = "/computeMetadata/v1/project/project-id"

// upstreamRounds runs the alternating rounds of upstreamBench for one choice of keys.
func upstreamRounds(cfg benchConfig, bare, mc *process, keys string, pathOf func(int) string) error {
	fmt.Printf("\nupstream path, cache off, %s, %d rounds of %s, alternating; load average %s\n",
		keys, cfg.rounds, cfg.roundTime, loadAvg())
	targets := []*process{bare, mc}
	labels := map[*process]string{bare: "bare httputil.ReverseProxy", mc: "metaconceal-proxy, cache off"}
	if err := alternating(cfg, targets, labels, bare, func(addr string, conns int, d time.Duration) (*result, error) {
		return loadEach(addr, pathOf, conns, d)
	}); err != nil {
		return err
	}
	fmt.Printf("load average after: %s\n", loadAvg())
	return nil
}

// loadAvg is the first three fields of /proc/loadavg.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// alternating runs every target at every concurrency of cfg for cfg.rounds rounds,
// after a warm-up, rotating the order each round so that no target always runs first
// or last, and prints a row per target and concurrency with its throughput against
// bare's.
func alternating(cfg benchConfig, targets []*process, labels map[*process]string, bare *process, run func(addr string, conns int, d time.Duration) (*result, error)) error {
	type key struct {
		p     *process
		conns int
	}
	results := map[key]*result{}
	for _, t := range targets {
		// Warm-up: connections, pools and cache-warm paths.
		if _, err := run(t.addr, 50, 500*time.Millisecond); err != nil {
			return fmt.Errorf("warm-up %s: %w", t.name, err)
		}
	}
	for round := range cfg.rounds {
		for _, conns := range cfg.conns {
			order := slices.Clone(targets)
			for range round % len(order) {
				order = append(order[1:], order[0])
			}
			for _, t := range order {
				r, err := run(t.addr, conns, cfg.roundTime)
				if err != nil {
					return fmt.Errorf("%s at %d conns: %w", t.name, conns, err)
				}
				k := key{t, conns}
				if results[k] == nil {
					results[k] = &result{}
				}
				results[k].merge(r)
			}
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tconns\treq/s\tp50\tp99\terrors\tvs bare\t")
	for _, conns := range cfg.conns {
		bareRPS := results[key{bare, conns}].rps()
		for _, t := range targets {
			r := results[key{t, conns}]
			fmt.Fprintf(tw, "%s\t%d\t%.0f\t%s\t%s\t%d\t%.2fx\t\n", labels[t], conns, r.rps(),
				fmtDur(r.percentile(50)), fmtDur(r.percentile(99)), r.errors, r.rps()/bareRPS)
		}
	}
	return tw.Flush()
}
