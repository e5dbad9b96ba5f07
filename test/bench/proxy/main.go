// Command proxy is `make bench-proxy`: throughput and latency of metaconceal-proxy
// against the fake upstream directly and a bare httputil.ReverseProxy (limits off: one
// loopback client stands in for many pods), then 10,000 concurrent long polls held to
// their timeout; then, in a simulated node with the default limits and the host guard
// on (node.go), one attested pod flooding while another measures its latency, the
// same measure while exposed pods' records come and go (churn.go), and every pod of a
// full node at its caps at once (flood.go). --node-only runs only those.
//
// Apart from the simulated node, everything runs on 127.0.0.1 in separate processes: bin/fake-gce-metadata (the
// upstream), this binary re-executed as "bare-proxy" (the floor any Go proxy starts
// from), bin/metaconceal-proxy, and this process as the load generator. Its client
// is a minimal HTTP/1.1 keep-alive loop, so that the generator takes as little of the
// shared CPU as possible. Rounds alternate between targets and rotate their order.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testutil"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "bare-proxy" {
		os.Exit(bareProxy(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "load" {
		os.Exit(loadOnly(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "flood" {
		os.Exit(flooder(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:]))
}

// bareProxy is the comparison point: httputil.ReverseProxy with Rewrite + SetURL and
// a pooled transport sized like metaconceal-proxy's, no policy.
func bareProxy(args []string) int {
	fs := flag.NewFlagSet("bare-proxy", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "listen address")
	upstream := fs.String("upstream", "", "upstream URL")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	u, err := url.Parse(*upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare-proxy:", err)
		return 2
	}
	rp := &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(u) },
		Transport: &http.Transport{MaxIdleConnsPerHost: 1024, IdleConnTimeout: 90 * time.Second},
	}
	srv := &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare-proxy:", err)
		return 1
	}
	fmt.Fprintln(os.Stderr, "bare-proxy serving on", ln.Addr())
	if err := srv.Serve(ln); err != nil {
		fmt.Fprintln(os.Stderr, "bare-proxy:", err)
		return 1
	}
	return 0
}

// loadOnly runs the load generator alone against a running target, for profiling.
func loadOnly(args []string) int {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	addr := fs.String("addr", "", "target host:port")
	path := fs.String("path", "/computeMetadata/v1/project/project-id", "request path")
	conns := fs.Int("conns", 200, "keep-alive connections")
	d := fs.Duration("duration", 5*time.Second, "duration")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	r, err := load(*addr, *path, *conns, *d)
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		return 1
	}
	fmt.Printf("%.0f req/s p50 %s p99 %s errors %d\n", r.rps(), fmtDur(r.percentile(50)), fmtDur(r.percentile(99)), r.errors)
	return 0
}

type benchConfig struct {
	roundTime   time.Duration
	rounds      int
	conns       []int
	polls       int
	pollTimeout int
	flood       floodConfig
	nodeOnly    bool
}

func run(args []string) int {
	fs := flag.NewFlagSet("bench-proxy", flag.ContinueOnError)
	var cfg benchConfig
	fs.DurationVar(&cfg.roundTime, "round", 3*time.Second, "duration of one measured round")
	fs.IntVar(&cfg.rounds, "rounds", 3, "rounds per target and concurrency (alternating)")
	connsFlag := fs.String("conns", "50,200", "concurrent keep-alive connections, comma-separated")
	fs.IntVar(&cfg.polls, "long-polls", 10000, "concurrent long polls (0 skips)")
	fs.IntVar(&cfg.pollTimeout, "long-poll-timeout", 20, "timeout_sec of the long polls")
	fs.IntVar(&cfg.flood.polls, "flood-polls", 3000, "the flooding pod's distinct long poll loops (0 skips the flood bench)")
	fs.IntVar(&cfg.flood.hammers, "flood-hammers", 64, "the flooding pod's back-to-back request loops")
	fs.DurationVar(&cfg.flood.duration, "flood-phase", 8*time.Second, "each measured phase of the flood bench (idle, then under the flood)")
	fs.IntVar(&cfg.flood.victimRPS, "victim-rps", 80, "the measuring pod's request rate (under the default --pod-rate)")
	fs.IntVar(&cfg.flood.worstPods, "worst-case-pods", 110, "attested pods of the simulated node that fill the proxy at once, each at its default caps, after the flood (GKE's default maximum pods per node; 0 skips)")
	fs.IntVar(&cfg.flood.churnRate, "churn-rate", 20, "exposed pods' state records added (and as many deleted) per second while a concealed pod measures its latency, in the simulated node (0 skips)")
	fs.IntVar(&cfg.flood.churnPods, "churn-pods", 4, "exposed pods whose state records the churn adds and deletes")
	fs.BoolVar(&cfg.nodeOnly, "node-only", false, "run only the simulated node's sections (flood, exposed-pod churn, worst case)")
	fs.IntVar(&cfg.flood.nice, "flood-nice", 19, "nice level of the flooding pod's process (a pod's CPU is bounded by its cgroup's share; 0 lets it compete with the proxy as an equal)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	for s := range strings.SplitSeq(*connsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			fmt.Fprintf(os.Stderr, "bench-proxy: --conns %q: %v\n", *connsFlag, err)
			return 2
		}
		cfg.conns = append(cfg.conns, n)
	}
	if err := bench(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench-proxy:", err)
		return 1
	}
	return 0
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

type process struct {
	name string
	cmd  *exec.Cmd
	addr string
	logs *bytes.Buffer
}

func start(name, addr string, bin string, args ...string) (*process, error) {
	cmd := exec.Command(bin, args...)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, addr: addr, logs: logs}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return p, nil
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s did not listen on %s within 10s: %s", name, addr, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *process) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

// peakRSS reads the process's high-water resident set size (VmHWM) in KiB.
func (p *process) peakRSS() (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			return strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
		}
	}
	return 0, errors.New("no VmHWM in /proc status")
}

func bench(cfg benchConfig) error {
	bin, err := testutil.BinDir()
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if cfg.nodeOnly {
		return runNodeSections(bin, self, cfg.flood) // node.go
	}
	var upAddr, bareAddr, mcAddr, mcMetrics string
	for _, a := range []*string{&upAddr, &bareAddr, &mcAddr, &mcMetrics} {
		if *a, err = freeAddr(); err != nil {
			return err
		}
	}
	upstream, err := start("fake-gce-metadata", upAddr, filepath.Join(bin, "fake-gce-metadata"), "--listen", upAddr)
	if err != nil {
		return err
	}
	defer upstream.stop()
	bare, err := start("bare ReverseProxy", bareAddr, self, "bare-proxy", "--listen", bareAddr, "--upstream", "http://"+upAddr)
	if err != nil {
		return err
	}
	defer bare.stop()
	stateDir, err := os.MkdirTemp("", "bench-proxy-state-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateDir)
	mc, err := start("metaconceal-proxy", mcAddr, filepath.Join(bin, "metaconceal-proxy"),
		"--listen", mcAddr, "--upstream", "http://"+upAddr, "--metrics-listen", mcMetrics,
		"--state-dir", stateDir, "--log-format", "text",
		// One loopback client stands in for many pods here: per-pod and global limits
		// off, as the flags document for benchmarks (the flood bench runs with them on).
		"--pod-rate=0", "--pod-max-conns=0", "--pod-max-long-polls=0",
		"--max-upstream-long-polls=0", "--max-upstream-conns=0",
		// The machine's own netns: never install the host guard here; no ALTS relay.
		"--host-guard=false", "--alts-listen=")
	if err != nil {
		return err
	}
	defer mc.stop()

	targets := []*process{upstream, bare, mc}
	labels := map[*process]string{upstream: "(a) fake upstream direct", bare: "(b) bare httputil.ReverseProxy", mc: "(c) metaconceal-proxy"}
	fmt.Printf("bench-proxy: GET %s with Metadata-Flavor: Google, keep-alive, 127.0.0.1\n", path)
	fmt.Printf("%d rounds of %s per target and concurrency, alternating targets; %d CPUs shared by all processes\n\n",
		cfg.rounds, cfg.roundTime, numCPU())

	if err := alternating(cfg, targets, labels, bare, func(addr string, conns int, d time.Duration) (*result, error) {
		return load(addr, path, conns, d)
	}); err != nil {
		return err
	}
	if rss, err := mc.peakRSS(); err == nil {
		fmt.Printf("\nmetaconceal-proxy peak RSS after the throughput rounds: %.1f MiB\n", float64(rss)/1024)
	}
	if err := cacheBench(cfg, upstream); err != nil { // cache.go
		return err
	}
	if err := upstreamBench(cfg, upstream, bare); err != nil { // upstream.go
		return err
	}

	if cfg.polls > 0 {
		fmt.Printf("\nlong polls: %d concurrent GET ...?wait_for_change=true&timeout_sec=%d on metaconceal-proxy\n", cfg.polls, cfg.pollTimeout)
		if err := longPolls(mc, mcMetrics, cfg.polls, cfg.pollTimeout); err != nil {
			return err
		}
	}
	if cfg.flood.polls > 0 || cfg.flood.churnRate > 0 || cfg.flood.worstPods > 0 {
		mc.stop()
		bare.stop()
		upstream.stop()
		if err := runNodeSections(bin, self, cfg.flood); err != nil { // node.go
			return err
		}
	}
	return nil
}

func numCPU() int {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(data), "\nprocessor") + 1
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	}
}

type result struct {
	requests  int
	errors    int
	elapsed   time.Duration
	latencies []time.Duration
}

func (r *result) merge(o *result) {
	r.requests += o.requests
	r.errors += o.errors
	r.elapsed += o.elapsed
	r.latencies = append(r.latencies, o.latencies...)
}

func (r *result) rps() float64 {
	if r.elapsed == 0 {
		return 0
	}
	return float64(r.requests) / r.elapsed.Seconds()
}

func (r *result) percentile(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	slices.Sort(r.latencies)
	i := int(float64(len(r.latencies)-1) * p / 100)
	return r.latencies[i]
}

// client is one keep-alive HTTP/1.1 connection.
type client struct {
	addr string
	src  string // source address on lo, "" for any
	// dial, when set, makes the connection (simnode.DialContextIn: inside a netns).
	dial func(ctx context.Context, network, address string) (net.Conn, error)
	conn net.Conn
	br   *bufio.Reader
	req  []byte
}

func (c *client) connect() error {
	if c.dial != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := c.dial(ctx, "tcp", c.addr)
		if err != nil {
			return err
		}
		c.conn = conn
		c.br = bufio.NewReaderSize(conn, 4096)
		return nil
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	if c.src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(c.src)}
	}
	conn, err := d.Dial("tcp", c.addr)
	if err != nil {
		return err
	}
	c.conn = conn
	c.br = bufio.NewReaderSize(conn, 4096)
	return nil
}

func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// do sends the request and reads one response; it returns the status code.
func (c *client) do() (int, error) {
	if c.conn == nil {
		if err := c.connect(); err != nil {
			return 0, err
		}
	}
	if _, err := c.conn.Write(c.req); err != nil {
		c.close()
		return 0, err
	}
	status, closing, err := readResponseClose(c.br)
	if err != nil || closing {
		c.close()
	}
	return status, err
}

// readResponse parses a response with a Content-Length body and discards the body.
func readResponse(br *bufio.Reader) (int, error) {
	status, _, err := readResponseClose(br)
	return status, err
}

// readResponseClose is readResponse that also says whether the server closes the
// connection after this answer (Connection: close).
func readResponseClose(br *bufio.Reader) (int, bool, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, fmt.Errorf("bad status line %q", line)
	}
	length, closing := -1, false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		if len(line) <= 2 {
			break
		}
		switch {
		case len(line) > 16 && bytes.EqualFold(line[:15], []byte("Content-Length:")):
			length, err = strconv.Atoi(string(bytes.TrimSpace(line[15:])))
			if err != nil {
				return 0, false, fmt.Errorf("bad Content-Length %q", line)
			}
		case len(line) > 11 && bytes.EqualFold(line[:11], []byte("Connection:")):
			closing = bytes.EqualFold(bytes.TrimSpace(line[11:]), []byte("close"))
		}
	}
	if length < 0 {
		return 0, false, errors.New("response without Content-Length")
	}
	if _, err := br.Discard(length); err != nil {
		return 0, false, err
	}
	return status, closing, nil
}

func request(path string) []byte {
	return []byte("GET " + path + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n")
}

// load runs conns keep-alive clients against addr for d.
func load(addr, path string, conns int, d time.Duration) (*result, error) {
	return loadEach(addr, func(int) string { return path }, conns, d)
}

// loadEach is load with a path of its own for each client (pathOf(i) for the i-th).
func loadEach(addr string, pathOf func(int) string, conns int, d time.Duration) (*result, error) {
	var (
		wg      sync.WaitGroup
		stop    atomic.Bool
		mu      sync.Mutex
		total   = &result{}
		dialErr error
	)
	clients := make([]*client, conns)
	for i := range clients {
		clients[i] = &client{addr: addr, req: request(pathOf(i))}
		if err := clients[i].connect(); err != nil {
			dialErr = err
			break
		}
	}
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.close()
			}
		}
	}()
	if dialErr != nil {
		return nil, dialErr
	}
	start := time.Now()
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &result{latencies: make([]time.Duration, 0, 4096)}
			for !stop.Load() {
				t0 := time.Now()
				status, err := c.do()
				if err != nil || status != http.StatusOK {
					r.errors++
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
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	total.elapsed = time.Since(start)
	return total, nil
}

// longPolls holds n identical long polls on the proxy until their timeout and
// reports failures and the proxy's peak RSS.
func longPolls(mc *process, metricsAddr string, n, timeoutSec int) error {
	const attr = "/computeMetadata/v1/instance/attributes/cluster-name"
	c := &client{addr: mc.addr, req: request(attr)}
	etag, err := currentETag(c)
	c.close()
	if err != nil {
		return err
	}
	req := request(fmt.Sprintf("%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", attr, etag, timeoutSec))

	var (
		wg              sync.WaitGroup
		ok, failed      atomic.Int64
		firstErrOnce    sync.Once
		firstErr        error
		connected, sent atomic.Int64
	)
	fail := func(err error) {
		failed.Add(1)
		firstErrOnce.Do(func() { firstErr = err })
	}
	start := time.Now()
	sem := make(chan struct{}, 256) // dial in waves: the accept backlog is finite
	for range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			conn, err := net.DialTimeout("tcp", mc.addr, 10*time.Second)
			<-sem
			if err != nil {
				fail(fmt.Errorf("dial: %w", err))
				return
			}
			defer conn.Close()
			connected.Add(1)
			if _, err := conn.Write(req); err != nil {
				fail(fmt.Errorf("write: %w", err))
				return
			}
			sent.Add(1)
			_ = conn.SetReadDeadline(time.Now().Add(time.Duration(timeoutSec)*time.Second + 60*time.Second))
			status, err := readResponse(bufio.NewReaderSize(conn, 1024))
			switch {
			case err != nil:
				fail(fmt.Errorf("read: %w", err))
			case status != http.StatusOK:
				fail(fmt.Errorf("status %d", status))
			default:
				ok.Add(1)
			}
		}()
	}
	openedIn := time.Since(start)
	// Sample the proxy's own gauges while the polls are held.
	time.Sleep(time.Second)
	held, upstreamPolls := scrapeGauge(metricsAddr, "metaconceal_proxy_long_polls_open"), scrapeGauge(metricsAddr, "metaconceal_proxy_upstream_long_polls_open")
	wg.Wait()
	total := time.Since(start)
	rss, rssErr := mc.peakRSS()
	fmt.Printf("  opened %d connections in %s; proxy held %s polls on %s upstream request(s)\n", connected.Load(), openedIn.Round(time.Millisecond), held, upstreamPolls)
	fmt.Printf("  answered 200 at their timeout: %d, failed: %d, all done after %s\n", ok.Load(), failed.Load(), total.Round(time.Millisecond))
	if firstErr != nil {
		fmt.Printf("  first failure: %v\n", firstErr)
	}
	if rssErr != nil {
		return fmt.Errorf("read proxy RSS: %w", rssErr)
	}
	fmt.Printf("  metaconceal-proxy peak RSS (VmHWM): %.1f MiB\n", float64(rss)/1024)
	return nil
}

func currentETag(c *client) (string, error) {
	if err := c.connect(); err != nil {
		return "", err
	}
	if _, err := c.conn.Write(c.req); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	etag := resp.Header.Get("ETag")
	if resp.StatusCode != http.StatusOK || etag == "" {
		return "", fmt.Errorf("GET for the ETag: %s, ETag %q", resp.Status, etag)
	}
	return etag, nil
}

func scrapeGauge(addr, name string) string { return scrapeGaugeWith(http.DefaultClient, addr, name) }

// scrapeGaugeWith is scrapeGauge through c (for the proxy in the simulated node: a
// client whose connections are made in the node netns).
func scrapeGaugeWith(c *http.Client, addr, name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/metrics", nil)
	resp, err := c.Do(req)
	if err != nil {
		return "?"
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for l := range strings.SplitSeq(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return v
		}
	}
	return "?"
}
