package main

// The node sections' simulated node: a node netns (internal/testlib/simnode) with the
// fake metadata server on 169.254.169.254:80 and metaconceal-proxy as on a node
// (defaults, host guard on), a bridge with pod netns on veths, each pod named by a
// state record with its host interface, so that the guard attests it (the nat
// METACONCEAL-ATTEST chain: its address on its bridge port is DNATed to the attested
// port). The flood (flooder and victim, processes of their own in their netns), the
// exposed-pod churn (churn.go) and the worst-case fill (flood.go) run in it one after
// the other. Everything is removed when the bench ends, fails or is interrupted.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/state"
)

const (
	nodeBridge   = "mcbr0"
	nodeGateway  = "10.89.0.1"
	podPrefixLen = 24
	// nodeMetrics is the proxy's metrics address inside the node netns.
	nodeMetrics = "127.0.0.1:9989"
)

// Pods reach the metadata server's address, which the host guard DNATs to the proxy.
var (
	podTarget   = netip.AddrPortFrom(gce.MetadataIPv4, gce.MetadataPort).String()
	proxyListen = gce.Proxy.String()
)

// teardown runs cleanup steps in reverse order, once.
type teardown struct {
	mu    sync.Mutex
	steps []func()
	done  bool
}

func (td *teardown) add(f func()) {
	td.mu.Lock()
	defer td.mu.Unlock()
	td.steps = append(td.steps, f)
}

func (td *teardown) run() {
	td.mu.Lock()
	defer td.mu.Unlock()
	if td.done {
		return
	}
	td.done = true
	for i := len(td.steps) - 1; i >= 0; i-- {
		td.steps[i]()
	}
}

// benchPod is one pod of the simulated node.
type benchPod struct {
	ns, name, id, ip, hostIf string
	netns, netnsPath         string
}

// benchNode is the simulated node the node sections run in.
type benchNode struct {
	node     *simnode.Node
	td       *teardown
	stateDir string
	mc       *process
	metrics  *http.Client // connections made in the node netns
}

// addPod creates the pod's netns on the node's bridge and, unless exposedReason is
// "-", writes its state record as the CNI plugin's ADD does (exposedReason "" is a
// concealed pod).
func (b *benchNode) addPod(p *benchPod, exposedReason string) error {
	var err error
	if p.netns, p.netnsPath, err = b.node.AddBridgedPod("mc-bench-"+p.ns, nodeBridge, p.hostIf,
		fmt.Sprintf("%s/%d", p.ip, podPrefixLen), netip.MustParseAddr(nodeGateway)); err != nil {
		return fmt.Errorf("pod %s/%s: %w", p.ns, p.name, err)
	}
	if exposedReason == "-" {
		return nil
	}
	return b.writeRecord(p, exposedReason)
}

func (p *benchPod) record(exposedReason string) state.Record {
	return state.NewRecord(state.Attachment{Network: "bench", ContainerID: p.id, IfName: "eth0", Netns: p.netnsPath, HostIf: p.hostIf},
		state.PodRef{Namespace: p.ns, Name: p.name, UID: p.id}, []netip.Addr{netip.MustParseAddr(p.ip)}, exposedReason)
}

func (b *benchNode) writeRecord(p *benchPod, exposedReason string) error {
	if err := state.Write(b.stateDir, p.record(exposedReason)); err != nil {
		return fmt.Errorf("state record for %s/%s: %w", p.ns, p.name, err)
	}
	return nil
}

// attestedRules counts the rules of the guard's attestation chain (one per attested
// address and host interface) in the node netns.
func (b *benchNode) attestedRules() (int, error) {
	out, err := b.node.Exec(context.Background(), "iptables", "-t", "nat", "-S", hostguard.AttestChain)
	if err != nil {
		return 0, fmt.Errorf("attestation rules: %w", err)
	}
	return strings.Count(out, "-A "+hostguard.AttestChain+" "), nil
}

// waitAttested waits until the attestation chain holds n rules: the proxy's pod
// index has applied every record written so far.
func (b *benchNode) waitAttested(n int) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		got, err := b.attestedRules()
		if err != nil {
			return err
		}
		if got == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the host guard attests %d addresses after 60s, want %d", got, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// attestCounters returns the packet counter of each attestation rule by source
// address (the SYNs the kernel attested).
func (b *benchNode) attestCounters() (map[string]int64, error) {
	out, err := b.node.Exec(context.Background(), "iptables", "-t", "nat", "-L", hostguard.AttestChain, "-v", "-x", "-n")
	if err != nil {
		return nil, fmt.Errorf("attestation counters: %w", err)
	}
	m := map[string]int64{}
	for l := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 4 || !strings.HasPrefix(f[2], "METACONCEAL-ATTEST") {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("attestation counters: line %q: %w", l, err)
		}
		for _, x := range f[3:] { // the source: the first address after the target
			if a, err := netip.ParseAddr(x); err == nil {
				m[a.String()] += n
				break
			}
		}
	}
	return m, nil
}

// runNodeSections runs the sections that need a simulated node: the flood, the
// exposed-pod churn and the worst-case fill, in one node, one after the other.
func runNodeSections(bin, self string, fc floodConfig) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the flood, churn and worst-case sections run the proxy in a simulated node (network namespaces, the host guard's iptables rules): run as root, or pass --flood-polls 0 --churn-rate 0 --worst-case-pods 0 to skip them")
	}
	td := &teardown{}
	defer td.run()
	// Interrupted: tear down before exiting.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	stopSig := make(chan struct{})
	defer func() { signal.Stop(sigs); close(stopSig) }()
	go func() {
		select {
		case s := <-sigs:
			fmt.Fprintf(os.Stderr, "bench-proxy: %s: removing the simulated node\n", s)
			td.run()
			os.Exit(1)
		case <-stopSig:
		}
	}()

	node, err := simnode.New("mc-bench")
	if err != nil {
		return fmt.Errorf("simulated node: %w", err)
	}
	td.add(func() {
		if err := node.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "bench-proxy: removing the simulated node:", err)
		}
	})
	if err := node.AddBridge(nodeBridge, fmt.Sprintf("%s/%d", nodeGateway, podPrefixLen)); err != nil {
		return err
	}
	stateDir, err := os.MkdirTemp("", "bench-proxy-node-state-")
	if err != nil {
		return err
	}
	td.add(func() { os.RemoveAll(stateDir) })
	b := &benchNode{node: node, td: td, stateDir: stateDir}
	vict := &benchPod{ns: "victim", name: "app", id: "victim00000", ip: victimIP, hostIf: "mcbvictim"}
	if err := b.addPod(vict, ""); err != nil {
		return err
	}

	if _, err = startInNode(node, td, "fake-gce-metadata", podTarget, filepath.Join(bin, "fake-gce-metadata"), "--listen", podTarget); err != nil {
		return err
	}
	// As on a node: the defaults (host guard on, ALTS relay on), nothing else but
	// where the state records and the metrics are.
	if b.mc, err = startInNode(node, td, "metaconceal-proxy (defaults, host guard on)", proxyListen, filepath.Join(bin, "metaconceal-proxy"),
		"--upstream", "http://"+podTarget, "--metrics-listen", nodeMetrics, "--state-dir", stateDir,
		"--log-format", "text", "--log-level", "error"); err != nil {
		return err
	}
	b.metrics = simnode.HTTPClientIn(node.Path, 5*time.Second)
	if err := b.waitAttested(1); err != nil {
		return err
	}
	if fc.polls > 0 {
		if err := floodInNode(b, self, vict, fc); err != nil {
			return err
		}
	}
	if fc.churnRate > 0 {
		if err := churnInNode(b, self, vict, fc); err != nil {
			return fmt.Errorf("churn: %w", err)
		}
	}
	if fc.worstPods > 0 {
		if err := worstCaseInNode(b, fc.worstPods); err != nil {
			return fmt.Errorf("worst case: %w", err)
		}
	}
	return nil
}

// floodInNode runs the flood: a flooding pod joins the node; the victim measures.
func floodInNode(b *benchNode, self string, vict *benchPod, fc floodConfig) error {
	node, td, mc := b.node, b.td, b.mc
	flood := &benchPod{ns: "flood", name: "flooder", id: "flooder0000", ip: flooderIP, hostIf: "mcbflood"}
	if err := b.addPod(flood, ""); err != nil {
		return err
	}
	if err := b.waitAttested(2); err != nil {
		return err
	}
	attest0, err := b.attestCounters()
	if err != nil {
		return err
	}

	loadavg, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("\nflood: pod flood/flooder (%s) floods, pod victim/app (%s) measures; both attested by the host guard (METACONCEAL-ATTEST); metaconceal-proxy with its default limits, host guard on\n", flooderIP, victimIP)
	fmt.Printf("  simulated node netns %s: fake metadata server on %s, proxy on %s; pods on bridge %s (netns %s, %s), each a process of its own\n",
		node.Name, podTarget, proxyListen, nodeBridge, flood.netns, vict.netns)
	fmt.Printf("  load average before: %s", loadavg)
	fmt.Printf("  victim: GET %s at %d req/s over 4 keep-alive connections, %s per phase\n", victimPath, fc.victimRPS, fc.duration)
	fmt.Printf("  flooder (nice %d): %d loops of distinct long polls (each re-dials at once when answered or refused) + %d keep-alive loops sending back to back\n", fc.nice, fc.polls, fc.hammers)

	if _, err := runVictim(self, vict, fc.victimRPS, time.Second); err != nil { // warm-up
		return fmt.Errorf("victim warm-up: %w", err)
	}
	idle, err := runVictim(self, vict, fc.victimRPS, fc.duration)
	if err != nil {
		return fmt.Errorf("victim, idle: %w", err)
	}

	etag, err := etagIn(vict.netnsPath, victimPath)
	if err != nil {
		return fmt.Errorf("ETag from the victim pod: %w", err)
	}
	dropsBefore, err := guardDrops(node)
	if err != nil {
		return err
	}
	fl := exec.Command("nice", "-n", strconv.Itoa(fc.nice), "ip", "netns", "exec", flood.netns, self, "flood",
		"--addr", podTarget, "--polls", strconv.Itoa(fc.polls), "--hammers", strconv.Itoa(fc.hammers),
		"--etag", etag, "--duration", (fc.duration + 3*time.Second).String())
	var flOut strings.Builder
	fl.Stdout = &flOut
	fl.Stderr = os.Stderr
	if err := fl.Start(); err != nil {
		return fmt.Errorf("start flooder: %w", err)
	}
	td.add(func() {
		if fl.ProcessState == nil {
			_ = fl.Process.Kill()
			_ = fl.Wait()
		}
	})
	time.Sleep(2 * time.Second) // let the flood build up
	pid := mc.cmd.Process.Pid
	var use proxyUsage
	use.fdsBefore = openFDs(pid)
	u0, s0 := cpuTicks(pid)
	t0 := time.Now()
	flooded, verr := runVictim(self, vict, fc.victimRPS, fc.duration)
	u1, s1 := cpuTicks(pid)
	secs := time.Since(t0).Seconds()
	use.user, use.sys = float64(u1-u0)/clockTicks/secs, float64(s1-s0)/clockTicks/secs
	use.fdsAfter = openFDs(pid)
	waitErr := fl.Wait()
	if verr != nil {
		return fmt.Errorf("victim, under flood: %w", verr)
	}
	if waitErr != nil {
		return fmt.Errorf("flooder: %w", waitErr)
	}
	var fs floodStats
	if err := json.Unmarshal([]byte(flOut.String()), &fs); err != nil {
		return fmt.Errorf("flooder output %q: %w", flOut.String(), err)
	}
	if use.peakRSSKiB, err = mc.peakRSS(); err != nil {
		return fmt.Errorf("proxy RSS: %w", err)
	}
	dropsAfter, err := guardDrops(node)
	if err != nil {
		return err
	}
	attest1, err := b.attestCounters()
	if err != nil {
		return err
	}
	printFlood(idle, flooded, fs, use, scrapeAllWith(b.metrics, nodeMetrics, "metaconceal_proxy_refused_requests_total"))
	fmt.Printf("  new connections the kernel attested during the flood (nat METACONCEAL-ATTEST counters, before the per-source limit drops some): flooder %d, victim %d\n",
		attest1[flooderIP]-attest0[flooderIP], attest1[victimIP]-attest0[victimIP])
	fmt.Printf("  host guard: %d new connections (SYNs, retransmissions included) dropped in the kernel over the per-source limit (%d/s, burst %d), none of them seen by the proxy\n",
		dropsAfter-dropsBefore, hostguard.DefaultConnRate, hostguard.DefaultConnBurst)
	return nil
}

// startInNode starts bin in the node netns and waits until addr accepts a connection
// there; the teardown stops it.
func startInNode(node *simnode.Node, td *teardown, name, addr, bin string, args ...string) (*process, error) {
	cmd := node.Command(context.Background(), bin, args...) // ip netns exec: it execs bin, same pid
	lw := &lockedBuilder{b: &strings.Builder{}}
	cmd.Stdout, cmd.Stderr = lw, lw
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, addr: addr}
	td.add(p.stop)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := simnode.DialIn(node.Path, "tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return p, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s did not listen on %s in %s within 15s: %s", name, addr, node.Name, lw.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lockedBuilder is a strings.Builder that two copying goroutines can write.
type lockedBuilder struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (l *lockedBuilder) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuilder) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// guardDrops sums the packet counters of the host guard's connection limit chain in
// the node netns.
func guardDrops(node *simnode.Node) (int64, error) {
	out, err := node.Exec(context.Background(), "iptables", "-t", "filter", "-L", hostguard.ChainLimit, "-v", "-x", "-n")
	if err != nil {
		return 0, fmt.Errorf("host guard counters: %w", err)
	}
	var total int64
	for l := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 || f[2] != "DROP" {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("host guard counters: line %q: %w", l, err)
		}
		total += n
	}
	return total, nil
}

// victimStats is what the measuring pod reports (JSON on stdout).
type victimStats struct {
	Requests   int     `json:"requests"`
	Errors     int     `json:"errors"`
	Latencies  []int64 `json:"latenciesNs"`
	ElapsedNs  int64   `json:"elapsedNs"`
	FirstError string  `json:"firstError,omitempty"`
}

// runVictim runs the measuring pod for d in its netns and returns what it measured.
func runVictim(self string, p *benchPod, rps int, d time.Duration) (*result, error) {
	cmd := exec.Command("ip", "netns", "exec", p.netns, self, "flood", "victim",
		"--addr", podTarget, "--rps", strconv.Itoa(rps), "--duration", d.String())
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("victim: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var vs victimStats
	if err := json.Unmarshal([]byte(stdout.String()), &vs); err != nil {
		return nil, fmt.Errorf("victim output %q: %w", stdout.String(), err)
	}
	if vs.FirstError != "" && vs.Requests == 0 {
		return nil, errors.New(vs.FirstError)
	}
	r := &result{requests: vs.Requests, errors: vs.Errors, elapsed: time.Duration(vs.ElapsedNs)}
	for _, l := range vs.Latencies {
		r.latencies = append(r.latencies, time.Duration(l))
	}
	return r, nil
}

// victimMain is the re-executed measuring pod ("flood victim"): it prints victimStats.
func victimMain(args []string) int {
	fs := flag.NewFlagSet("victim", flag.ContinueOnError)
	addr := fs.String("addr", "", "proxy (or metadata) host:port")
	rps := fs.Int("rps", 80, "requests per second")
	d := fs.Duration("duration", 8*time.Second, "how long to measure")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if _, _, err := net.SplitHostPort(*addr); err != nil {
		fmt.Fprintln(os.Stderr, "victim: --addr:", err)
		return 2
	}
	r, err := victim(*addr, "", *rps, *d)
	vs := victimStats{}
	if err != nil {
		vs.FirstError = err.Error()
	} else {
		vs.Requests, vs.Errors, vs.ElapsedNs = r.requests, r.errors, int64(r.elapsed)
		for _, l := range r.latencies {
			vs.Latencies = append(vs.Latencies, int64(l))
		}
	}
	out, _ := json.Marshal(vs)
	fmt.Println(string(out))
	return 0
}
