package main

// The cache figures of `make bench-proxy` (issue 13): metaconceal-proxy, cache on (its
// default), against the fake metadata server reached directly, on project-id and on
// the token endpoint, side by side in the same run and with the same load generator;
// then a start-up burst of 1,000 clients asking a cold proxy for a token at once,
// counting the requests that reach the upstream.

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

const (
	benchProjectID = "/computeMetadata/v1/project/project-id"
	benchToken     = "/computeMetadata/v1/instance/service-accounts/default/token"
	burstClients   = 1000
)

// cacheBench runs both parts against upstream, the running fake. It starts a proxy of
// its own, with the per-pod limits off (--pod-rate=0 --pod-max-conns=0): the load
// comes from one source IP, and what is measured is the data path, not a limit.
func cacheBench(cfg benchConfig, upstream *process) error {
	mc, mcMetrics, stop, err := startProxy("metaconceal-proxy (cache)", "http://"+upstream.addr, "--pod-rate=0", "--pod-max-conns=0")
	if err != nil {
		return err
	}
	defer stop()
	fmt.Printf("\ncache: metaconceal-proxy (cache on, its default) vs the fake upstream direct, %d rounds of %s, alternating\n", cfg.rounds, cfg.roundTime)
	targets := []*process{upstream, mc}
	paths := []string{benchProjectID, benchToken}
	type key struct {
		p     *process
		path  string
		conns int
	}
	results := map[key]*result{}
	cpu := map[key]time.Duration{} // the target process's CPU time over its rounds
	for _, t := range targets {
		for _, path := range paths {
			if _, err := load(t.addr, path, 50, 500*time.Millisecond); err != nil {
				return fmt.Errorf("warm-up %s %s: %w", t.name, path, err)
			}
		}
	}
	tokenMisses0 := scrapeGauge(mcMetrics, `metaconceal_proxy_cache_misses_total{kind="token"}`)
	var tokenRequests int
	for round := range cfg.rounds {
		for _, conns := range cfg.conns {
			for _, path := range paths {
				order := slices.Clone(targets)
				if round%2 == 1 {
					slices.Reverse(order)
				}
				for _, t := range order {
					cpu0, cpuErr0 := t.cpuTime()
					r, err := load(t.addr, path, conns, cfg.roundTime)
					if err != nil {
						return fmt.Errorf("%s %s at %d conns: %w", t.name, path, conns, err)
					}
					cpu1, cpuErr1 := t.cpuTime()
					if err := errors.Join(cpuErr0, cpuErr1); err != nil {
						return fmt.Errorf("CPU time of %s: %w", t.name, err)
					}
					k := key{t, path, conns}
					cpu[k] += cpu1 - cpu0
					if results[k] == nil {
						results[k] = &result{}
					}
					results[k].merge(r)
					if t == mc && path == benchToken {
						tokenRequests += r.requests
					}
				}
			}
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "endpoint\tconns\tdirect req/s\tproxy req/s\tproxy/direct\tdirect p50\tproxy p50\tdirect p99\tproxy p99\tdirect CPU/req\tproxy CPU/req\terrors (direct/proxy)\t")
	for _, path := range paths {
		name := path[strings.LastIndexByte(path, '/')+1:]
		for _, conns := range cfg.conns {
			d, p := results[key{upstream, path, conns}], results[key{mc, path, conns}]
			perReq := func(t *process, r *result) string {
				if r.requests == 0 {
					return "-"
				}
				return fmt.Sprintf("%.1fµs", float64(cpu[key{t, path, conns}])/float64(r.requests)/float64(time.Microsecond))
			}
			fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f\t%.2fx\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t\n", name, conns, d.rps(), p.rps(), p.rps()/d.rps(),
				fmtDur(d.percentile(50)), fmtDur(p.percentile(50)), fmtDur(d.percentile(99)), fmtDur(p.percentile(99)),
				perReq(upstream, d), perReq(mc, p), d.errors, p.errors)
		}
	}
	tw.Flush()
	fmt.Println("(CPU/req: the serving process's user+system CPU time over its rounds, per answered request; the load generator's is not counted)")
	fmt.Printf("token requests served by the proxy in the measured rounds: %d; upstream token requests for them (cache misses): %s -> %s; refreshes: %s\n",
		tokenRequests, tokenMisses0, scrapeGauge(mcMetrics, `metaconceal_proxy_cache_misses_total{kind="token"}`),
		scrapeGauge(mcMetrics, `metaconceal_proxy_cache_refreshes_total{result="renewed"}`))
	fmt.Printf("proxy: cache hits (fact/token) %s/%s, upstream requests saved %s\n",
		scrapeGauge(mcMetrics, `metaconceal_proxy_cache_hits_total{kind="fact"}`),
		scrapeGauge(mcMetrics, `metaconceal_proxy_cache_hits_total{kind="token"}`),
		scrapeGauge(mcMetrics, "metaconceal_proxy_upstream_requests_saved_total"))
	return coldBurst()
}

// coldBurst starts a counting fake upstream in this process and a fresh proxy in
// front of it, then sends burstClients token requests at once, through the proxy and
// then directly, and counts what reached the upstream each time.
func coldBurst() error {
	fake := fakegce.New()
	var tokenRequests atomic.Int64
	fake.OnRequest(func(r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/token") {
			tokenRequests.Add(1)
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	upAddr := ln.Addr().String()

	// Outside a node netns no client is an attested pod: all 1,000 share the one
	// unattributed budget, whose per-pod connection cap and rate would refuse most of
	// them (the per-pod limits with attested pods are the node sections' work). Off
	// here; the node-wide upstream caps stay on, as in a real start-up burst.
	cold, metricsAddr, stop, err := startProxy("cold metaconceal-proxy", "http://"+upAddr, "--pod-rate=0", "--pod-max-conns=0")
	if err != nil {
		return err
	}
	defer stop()
	addr := cold.addr

	fmt.Printf("\ncold start-up burst: %d clients ask for a token at once (connections open first, requests released together)\n", burstClients)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tupstream token requests\tanswered 200\terrors\tp50\tp99\tmax\t")
	for _, t := range []struct{ label, addr string }{{"(c) metaconceal-proxy, cold", addr}, {"(a) fake upstream direct", upAddr}} {
		before := tokenRequests.Load()
		r, err := burst(t.addr, benchToken, burstClients)
		if err != nil {
			return fmt.Errorf("burst on %s: %w", t.label, err)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%s\t%s\t\n", t.label, tokenRequests.Load()-before, r.requests, r.errors,
			fmtDur(r.percentile(50)), fmtDur(r.percentile(99)), fmtDur(r.percentile(100)))
	}
	tw.Flush()
	fmt.Printf("cold proxy: coalesced requests %s, cache misses (token) %s\n",
		scrapeGauge(metricsAddr, "metaconceal_proxy_coalesced_requests_total"),
		scrapeGauge(metricsAddr, `metaconceal_proxy_cache_misses_total{kind="token"}`))
	return nil
}

// cpuTime is the process's user plus system CPU time so far (/proc/<pid>/stat).
func (p *process) cpuTime() (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14 of the whole line
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	const clockTicks = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// startProxy starts bin/metaconceal-proxy on a free loopback address in front of
// upstreamURL, outside any node netns (so without the host guard and the ALTS relay).
func startProxy(name, upstreamURL string, extra ...string) (*process, string, func(), error) {
	bin, err := testutil.BinDir()
	if err != nil {
		return nil, "", nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, "", nil, err
	}
	metricsAddr, err := freeAddr()
	if err != nil {
		return nil, "", nil, err
	}
	stateDir, err := os.MkdirTemp("", "bench-proxy-cache-")
	if err != nil {
		return nil, "", nil, err
	}
	args := append([]string{"--listen", addr, "--upstream", upstreamURL, "--metrics-listen", metricsAddr,
		"--state-dir", stateDir, "--log-format", "text", "--alts-listen=",
		// The machine's own netns: never install the host guard here.
		"--host-guard=false"}, extra...)
	p, err := start(name, addr, filepath.Join(bin, "metaconceal-proxy"), args...)
	if err != nil {
		os.RemoveAll(stateDir)
		return nil, "", nil, err
	}
	return p, metricsAddr, func() { p.stop(); os.RemoveAll(stateDir) }, nil
}

// burst opens n connections, then sends one request on each at the same moment and
// reads the answers; latencies count from that moment.
func burst(addr, path string, n int) (*result, error) {
	req := request(path)
	clients := make([]*client, n)
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.close()
			}
		}
	}()
	for i := range clients {
		// 127.0.0.0/8 is all on lo: client i is "pod" 127.1.x.y.
		c := &client{addr: addr, req: req, src: fmt.Sprintf("127.1.%d.%d", i>>8, i&0xff+1)}
		if err := c.connect(); err != nil {
			return nil, fmt.Errorf("dial %d from %s: %w", i, c.src, err)
		}
		clients[i] = c
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total = &result{}
		ready sync.WaitGroup
	)
	release := make(chan struct{})
	var start time.Time
	for _, c := range clients {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			ready.Done()
			<-release
			status, err := c.do()
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if err != nil || status != http.StatusOK {
				total.errors++
				return
			}
			total.requests++
			total.latencies = append(total.latencies, took)
		}()
	}
	ready.Wait()
	start = time.Now()
	close(release)
	wg.Wait()
	total.elapsed = time.Since(start)
	if total.requests == 0 {
		return total, errors.New("no request answered")
	}
	return total, nil
}
