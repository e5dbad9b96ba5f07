package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// The addresses, paths and names every e2e node uses.
const (
	MetadataURL   = "http://169.254.169.254"
	ProxyAddr     = "169.254.169.252:988"
	ProxyURL      = "http://" + ProxyAddr
	MetadataIP6   = "fd20:ce::254" // GCE's metadata server on IPv6
	ProxyAddr6    = "[fd20:ce::252]:988"
	PodSubnet     = "10.77.0.0/24"
	PodSubnet6    = "fd00:77::/64"
	ExcludedNS    = "kube-system" // the conflist's excludeNamespaces
	MetricsURL    = "http://127.0.0.1:9988/metrics"
	KubeEnvPath   = "/computeMetadata/v1/instance/attributes/kube-env"
	ProjectIDPath = "/computeMetadata/v1/project/project-id"
	// ConcealedBody is the proxy's answer to a concealed request (one trailing newline).
	ConcealedBody = "This metadata endpoint is concealed."
)

// NodeConfig says which node to build.
type NodeConfig struct {
	// DualStack: the dual-stack conflist, pods also in PodSubnet6, the fake server and
	// the proxy also on GCE's IPv6 addresses.
	DualStack bool
	// Metaconceal are more keys of the plugin's conflist entry (e.g. {"alts": "reject"}).
	Metaconceal map[string]any
}

// Node is one simulated GCE node with everything running on it: a node netns
// (internal/testlib/simnode), the fake GCE metadata server on 169.254.169.254:80 logging every
// request, metaconceal-proxy --host-guard on 169.254.169.252:988, and containerd + runc
// whose CNI conflist is the first bridge + host-local + metaconceal one of conf/ (or
// METACONCEAL_E2E_CONF_DIR), metaconceal called through a recorder that logs each call.
// Everything lives in the node netns and one temp dir; Close removes it all, and so does
// SIGINT/SIGTERM (see CatchSignals).
type Node struct {
	NS         *simnode.Node
	RT         *Runtime
	Bin        string // the project's binaries (METACONCEAL_BIN, default bin/)
	Dir        string // the node's temp dir
	StateDir   string // the plugin's stateDir
	PluginLog  string
	CNICalls   string // the recorder's log: one line per metaconceal call
	ProxyLog   string // the proxy's stdout and stderr (audit lines)
	FakeLog    string // the fake metadata server's request log: who reached it directly
	ProxyArgs  []string
	KubeEnv    string // kube-env as the node (full access) reads it: the secret
	ProjectID  string
	SecretLine string // the longest line of kube-env, searched for in every answer

	td    *teardown
	mu    sync.Mutex
	proxy *Process
	fake  *Process
}

// StartNode builds a node. On error everything already made is removed again.
func StartNode(ctx context.Context, cfg NodeConfig) (n *Node, err error) {
	root, bin, err := moduleAndBin()
	if err != nil {
		return nil, err
	}
	for _, b := range []string{"metaconceal", "metaconceal-proxy", "fake-gce-metadata", "bridge", "host-local", "loopback", "crictl"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return nil, fmt.Errorf("%s missing in %s (run `make build`): %w", b, bin, err)
		}
	}
	n = &Node{Bin: bin, td: &teardown{}}
	live.add(n)
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
			n = nil
		}
	}()

	var nodeAddrs []string
	if cfg.DualStack {
		nodeAddrs = []string{MetadataIP6 + "/128", "fd20:ce::252/128"}
	}
	if n.NS, err = simnode.New("mc-e2e", nodeAddrs...); err != nil {
		return n, fmt.Errorf("create node netns: %w", err)
	}
	n.td.add("delete node netns", n.NS.Close)
	// A short dir of our own: containerd's socket path must stay under 108 bytes.
	if n.Dir, err = os.MkdirTemp("", "mc-e2e-"); err != nil {
		return n, err
	}
	dir := n.Dir
	n.td.add("remove "+dir, func() error { return os.RemoveAll(dir) })
	n.StateDir = filepath.Join(dir, "metaconceal-state")
	n.PluginLog = filepath.Join(dir, "metaconceal-plugin.log")
	n.CNICalls = filepath.Join(dir, "cni-calls.log")
	n.ProxyLog = filepath.Join(dir, "proxy.log")
	n.FakeLog = filepath.Join(dir, "fake-gce.log")

	if err := n.startFakeGCE(ctx, cfg.DualStack); err != nil {
		return n, err
	}
	proxyListen := ProxyAddr
	if cfg.DualStack {
		proxyListen += "," + ProxyAddr6
	}
	n.ProxyArgs = []string{"--listen", proxyListen, "--upstream", MetadataURL,
		"--metrics-listen", "127.0.0.1:9988", "--state-dir", n.StateDir}
	// Idempotent: a test may have removed it already. Registered before the proxy's
	// own stop step, so it runs after it.
	n.td.add("remove the host guard", func() error { return n.RemoveHostGuard(context.Background()) })
	n.td.add("stop metaconceal-proxy", n.StopProxy)
	if err := n.StartProxy(ctx); err != nil {
		return n, err
	}
	if err := n.startRuntime(ctx, root, cfg); err != nil {
		return n, err
	}
	return n, nil
}

func moduleAndBin() (root, bin string, err error) {
	if root, err = testutil.ModuleRoot(); err != nil {
		return "", "", err
	}
	if bin, err = testutil.BinDir(); err != nil {
		return "", "", err
	}
	return root, bin, nil
}

func (n *Node) startFakeGCE(ctx context.Context, dualStack bool) error {
	listen := "169.254.169.254:80"
	if dualStack {
		listen += ",[" + MetadataIP6 + "]:80"
	}
	fake, err := StartInNode(n.NS, n.FakeLog, filepath.Join(n.Bin, "fake-gce-metadata"), "--listen", listen, "--log-requests")
	if err != nil {
		return err
	}
	n.fake = fake
	n.td.add("stop fake GCE server", func() error { return fake.Stop(syscall.SIGTERM, 5*time.Second) })
	err = waitFor("fake GCE metadata server", func() error {
		if fake.Exited() {
			return fmt.Errorf("exited: %s", Tail(n.FakeLog, 10))
		}
		r := MetadataGet(ctx, n.NS.Path, MetadataURL+ProjectIDPath)
		if r.Status != 200 {
			return fmt.Errorf("%s", r)
		}
		n.ProjectID = r.Body
		return nil
	})
	if err != nil {
		return err
	}
	r := MetadataGet(ctx, n.NS.Path, MetadataURL+KubeEnvPath)
	if r.Status != 200 || strings.TrimSpace(r.Body) == "" {
		return fmt.Errorf("kube-env from the node: %s", r)
	}
	n.KubeEnv = r.Body
	for _, line := range strings.Split(n.KubeEnv, "\n") {
		if len(line) > len(n.SecretLine) {
			n.SecretLine = line
		}
	}
	return nil
}

func (n *Node) startRuntime(ctx context.Context, root string, cfg NodeConfig) error {
	dir := n.Dir
	pauseBin, err := BuildPauseBinary(ctx, root, dir)
	if err != nil {
		return err
	}
	archive := filepath.Join(dir, "pause.tar")
	if err := WritePauseArchive(pauseBin, archive, PauseImageRef); err != nil {
		return err
	}
	confRoot := filepath.Join(root, "conf")
	if d := os.Getenv("METACONCEAL_E2E_CONF_DIR"); d != "" {
		confRoot = d
	}
	example, err := FindExampleConflist(confRoot, cfg.DualStack)
	if err != nil {
		return err
	}
	shipped, err := os.ReadFile(example)
	if err != nil {
		return err
	}
	network := "mc-e2e-" + simnode.RandomSuffix()
	subnets := []string{PodSubnet}
	if cfg.DualStack {
		subnets = append(subnets, PodSubnet6)
	}
	conflist, err := RewriteConflist(shipped, ConflistOptions{
		Name: network, Bridge: "mce2e0", Subnets: subnets,
		IPAMDir: filepath.Join(dir, "ipam"), StateDir: n.StateDir, LogFile: n.PluginLog,
		Exclude: []string{ExcludedNS}, Metaconceal: cfg.Metaconceal,
		// containerd 1.6's libcni reads results up to spec 1.0.0.
		CNIVersion: "1.0.0",
	})
	if err != nil {
		return fmt.Errorf("%s: %w", example, err)
	}
	// metaconceal is called through a recorder that logs each call (command, container
	// id, netns, exit code) before handing over stdin and stdout unchanged.
	recorder := filepath.Join(dir, "metaconceal-recorder")
	script := fmt.Sprintf("#!/bin/sh\n\"$(dirname \"$0\")/metaconceal.real\" \"$@\"\nrc=$?\necho \"$CNI_COMMAND $CNI_CONTAINERID netns=$CNI_NETNS rc=$rc\" >> %q\nexit $rc\n",
		n.CNICalls)
	if err := os.WriteFile(recorder, []byte(script), 0o755); err != nil {
		return err
	}
	runtimeDir := filepath.Join(dir, "rt")
	if err := os.MkdirAll(runtimeDir, 0o755); err != nil {
		return err
	}
	rt, err := Start(ctx, Config{
		Node: n.NS, Dir: runtimeDir,
		CNIBinaries: map[string]string{
			"bridge":           filepath.Join(n.Bin, "bridge"),
			"host-local":       filepath.Join(n.Bin, "host-local"),
			"loopback":         filepath.Join(n.Bin, "loopback"),
			"metaconceal":      recorder,
			"metaconceal.real": filepath.Join(n.Bin, "metaconceal"),
		},
		CNIConflist: conflist, NetworkName: network,
		PauseArchive: archive, CrictlPath: filepath.Join(n.Bin, "crictl"),
	})
	if err != nil {
		return err
	}
	n.RT = rt
	n.td.add("stop the runtime and remove its leftovers", rt.Close)
	return nil
}

// Close stops and removes everything of the node, newest first, collecting errors.
// Idempotent.
func (n *Node) Close() error {
	err := n.td.runAll()
	live.remove(n)
	return err
}

// LogTails is the end of the containerd, proxy and plugin logs, for a failing test.
func (n *Node) LogTails() string {
	var b strings.Builder
	if n.RT != nil {
		fmt.Fprintf(&b, "containerd log tail:\n%s\n", Tail(n.RT.LogPath, 40))
	}
	fmt.Fprintf(&b, "proxy log tail:\n%s\nplugin log tail:\n%s", Tail(n.ProxyLog, 20), Tail(n.PluginLog, 20))
	return b.String()
}

// StartProxy starts metaconceal-proxy --host-guard in the node netns and waits until
// it serves project-id. Starting it while it runs is an error.
func (n *Node) StartProxy(ctx context.Context) error {
	n.mu.Lock()
	if n.proxy != nil && !n.proxy.Exited() {
		n.mu.Unlock()
		return errors.New("metaconceal-proxy is already running")
	}
	p, err := StartInNode(n.NS, n.ProxyLog, filepath.Join(n.Bin, "metaconceal-proxy"), append(slices.Clone(n.ProxyArgs), "--host-guard")...)
	if err == nil {
		n.proxy = p
	}
	n.mu.Unlock()
	if err != nil {
		return err
	}
	return waitFor("metaconceal-proxy", func() error {
		if p.Exited() {
			return fmt.Errorf("exited: %s", Tail(n.ProxyLog, 10))
		}
		r := MetadataGet(ctx, n.NS.Path, ProxyURL+ProjectIDPath)
		if r.Status != 200 {
			return fmt.Errorf("%s", r)
		}
		return nil
	})
}

// StopProxy stops metaconceal-proxy (SIGTERM, then SIGKILL after 15 s); nil when it is
// not running.
func (n *Node) StopProxy() error {
	n.mu.Lock()
	p := n.proxy
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Stop(syscall.SIGTERM, 15*time.Second)
}

// RemoveHostGuard runs metaconceal-proxy --remove-host-guard in the node netns.
// Idempotent.
func (n *Node) RemoveHostGuard(ctx context.Context) error {
	out, err := n.NS.Exec(ctx, filepath.Join(n.Bin, "metaconceal-proxy"), append(slices.Clone(n.ProxyArgs), "--remove-host-guard")...)
	if err != nil {
		return fmt.Errorf("metaconceal-proxy --remove-host-guard: %w (%s)", err, out)
	}
	return nil
}

// Pod is a sandbox made through StartPod.
type Pod struct {
	ID, Namespace, Name string
	Netns               string // the sandbox's netns path; empty for hostNetwork
	Sandbox             Sandbox
}

// StartPod runs a sandbox (`crictl runp`) and reads its netns, pid and addresses.
// The returned Pod carries the ID also on error when the sandbox was made.
func (n *Node) StartPod(ctx context.Context, spec PodSpec) (Pod, error) {
	id, err := n.RT.RunPod(ctx, spec)
	if err != nil {
		return Pod{ID: id}, err
	}
	sb, err := n.RT.Inspect(ctx, id)
	if err != nil {
		return Pod{ID: id}, err
	}
	if !spec.HostNetwork && sb.NetnsPath == "" {
		return Pod{ID: id}, fmt.Errorf("sandbox %s/%s has no netns path", spec.Namespace, spec.Name)
	}
	return Pod{ID: id, Namespace: spec.Namespace, Name: spec.Name, Netns: sb.NetnsPath, Sandbox: sb}, nil
}

// CNICall is one call of the plugin as the recorder logged it.
type CNICall struct{ Command, Netns, RC string }

var cniCallLine = regexp.MustCompile(`^(\S+) (\S+) netns=(\S*) rc=(\d+)$`)

// CNICallsFor returns the recorded plugin calls for one container id, in order.
func (n *Node) CNICallsFor(id string) ([]CNICall, error) {
	data, err := readIfExists(n.CNICalls)
	if err != nil {
		return nil, err
	}
	var calls []CNICall
	for _, line := range strings.Split(data, "\n") {
		m := cniCallLine.FindStringSubmatch(line)
		if m != nil && m[2] == id {
			calls = append(calls, CNICall{Command: m[1], Netns: m[3], RC: m[4]})
		}
	}
	return calls, nil
}

// FakeLogSize is the fake server's request log's length now: an offset for
// DirectRequests.
func (n *Node) FakeLogSize() int {
	st, err := os.Stat(n.FakeLog)
	if err != nil {
		return 0
	}
	return int(st.Size())
}

var remoteInPodSubnet = regexp.MustCompile(`remote=(10\.77\.0\.\d+|\[fd00:77::[0-9a-f:]+\]):\d+`)

// DirectRequests returns the fake metadata server's request-log lines from offset
// since on whose client is a pod address (PodSubnet, PodSubnet6) and, when from is not
// nil, one of from: requests that went around the proxy. Every request of a pod
// metaconceal covers arrives from the proxy's address.
func (n *Node) DirectRequests(since int, from []string) ([]string, error) {
	log, err := readIfExists(n.FakeLog)
	if err != nil {
		return nil, err
	}
	if !strings.Contains(log, "remote=") {
		return nil, fmt.Errorf("the fake server logged no request with its client address; the check would prove nothing:\n%s", Tail(n.FakeLog, 5))
	}
	log = log[min(since, len(log)):]
	var out []string
	for _, line := range strings.Split(log, "\n") {
		m := remoteInPodSubnet.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		ip := strings.Trim(m[1], "[]")
		if from == nil || slices.Contains(from, ip) {
			out = append(out, line)
		}
	}
	return out, nil
}

func readIfExists(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	return string(data), nil
}

// ourRule matches an iptables-save line that belongs to metaconceal: anything naming
// the metadata or proxy address, or a chain of ours.
var ourRule = regexp.MustCompile(`(?i)169\.254\.169\.25[24]|fd20:ce::25[24]|metaconceal|\bMC-`)

// heartbeat matches the time in the guard generation marker's comment.
var heartbeat = regexp.MustCompile(`heartbeat=[0-9]+`)

func filterOurs(dump string) string {
	var out []string
	for _, line := range strings.Split(dump, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		if ourRule.MatchString(line) {
			// The guard generation marker's heartbeat is a time (pkg/hostguard,
			// generation.go): the rule is the same whatever the second.
			out = append(out, heartbeat.ReplaceAllString(line, "heartbeat=N"))
		}
	}
	return strings.Join(out, "\n")
}

// SaveTools are the iptables-save binaries on PATH (nft and legacy, v4 and v6).
func SaveTools() []string {
	var tools []string
	for _, tool := range []string{"iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if _, err := exec.LookPath(tool); err == nil {
			tools = append(tools, tool)
		}
	}
	return tools
}

// RulesOfOurs returns our lines in every iptables backend's dump of the netns at
// path, each group headed by the tool's name; "" when there are none.
func RulesOfOurs(ctx context.Context, netnsPath string) (string, error) {
	var all []string
	for _, tool := range SaveTools() {
		out, err := simnode.Run(ctx, "nsenter", "--net="+netnsPath, tool)
		if err != nil {
			return "", fmt.Errorf("%s in %s: %w", tool, netnsPath, err)
		}
		if ours := filterOurs(out); ours != "" {
			all = append(all, tool+":\n"+ours)
		}
	}
	return strings.Join(all, "\n"), nil
}

// RulesOfOursIn is RulesOfOurs for a netns held open by f (whose bind mount may be
// gone).
func RulesOfOursIn(f *os.File) (string, error) {
	var all []string
	for _, tool := range SaveTools() {
		cmd := exec.Command("nsenter", "--net=/proc/self/fd/3", tool)
		cmd.ExtraFiles = []*os.File{f}
		out, err := cmd.Output()
		if err != nil {
			return "", fmt.Errorf("%s in held netns: %w", tool, err)
		}
		if ours := filterOurs(string(out)); ours != "" {
			all = append(all, tool+":\n"+ours)
		}
	}
	return strings.Join(all, "\n"), nil
}

// HostRules reads (never changes) the machine's own iptables: our lines per tool, for
// checking that nothing of ours ever lands there.
func HostRules(ctx context.Context) (string, error) {
	var all []string
	for _, tool := range SaveTools() {
		out, err := simnode.Run(ctx, tool)
		if err != nil {
			return "", fmt.Errorf("%s: %w", tool, err)
		}
		all = append(all, tool+":\n"+filterOurs(out))
	}
	return strings.Join(all, "\n"), nil
}

// FlushAll is what a pod holding CAP_NET_ADMIN can do to its own netns: flush and
// delete every chain of every table, with every iptables binary it may have. A table
// a backend does not hold is no error; callers check with RulesOfOurs afterwards.
func FlushAll(ctx context.Context, netnsPath string) {
	for _, tool := range []string{"iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"} {
		if _, err := exec.LookPath(tool); err != nil {
			continue
		}
		for _, table := range []string{"nat", "filter", "mangle", "raw"} {
			for _, op := range []string{"-F", "-X"} {
				_, _ = simnode.Run(ctx, "nsenter", "--net="+netnsPath, tool, "-w", "-t", table, op)
			}
		}
	}
}

// SameNetns reports whether two netns files (bind mount or /proc/PID/ns/net) are the
// same namespace.
func SameNetns(a, b string) (bool, error) {
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := syscall.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// Process is a program started inside a node netns (`ip netns exec` execs it, so the
// pid is the program's own), its stdout and stderr appended to a log file.
type Process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// StartInNode starts name with args in the node's netns.
func StartInNode(node *simnode.Node, logPath, name string, args ...string) (*Process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", node.Name, name}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends sig and waits up to grace, then kills; nil when it exited in time (or
// had already exited).
func (p *Process) Stop(sig syscall.Signal, grace time.Duration) error {
	if p.Exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return fmt.Errorf("%s did not exit within %s of %s; killed", p.cmd.Path, grace, sig)
}

func waitFor(what string, ready func() error) error {
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = ready(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after 15s: %w", what, err)
}

// teardown runs each cleanup step once, newest first: from Close normally, or from
// the signal handler when the run is interrupted (Ctrl-C on `make e2e`, a CI cancel),
// since Go runs no t.Cleanup for a test binary that is killed.
type teardown struct {
	mu    sync.Mutex
	steps []*teardownStep
}

type teardownStep struct {
	what string
	once sync.Once
	fn   func() error
	err  error
}

func (td *teardown) add(what string, fn func() error) {
	td.mu.Lock()
	td.steps = append(td.steps, &teardownStep{what: what, fn: fn})
	td.mu.Unlock()
}

func (td *teardown) runAll() error {
	td.mu.Lock()
	steps := slices.Clone(td.steps)
	td.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		s := steps[i]
		s.once.Do(func() { s.err = s.fn() })
		if s.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.what, s.err))
		}
	}
	return errors.Join(errs...)
}

// live is every node not yet closed, for the signal handler.
var live = &registry{nodes: map[*Node]bool{}}

type registry struct {
	mu    sync.Mutex
	nodes map[*Node]bool
	once  sync.Once
}

func (r *registry) add(n *Node) {
	r.once.Do(r.catchSignals)
	r.mu.Lock()
	r.nodes[n] = true
	r.mu.Unlock()
}

func (r *registry) remove(n *Node) {
	r.mu.Lock()
	delete(r.nodes, n)
	r.mu.Unlock()
}

// catchSignals closes every live node on SIGINT or SIGTERM, then exits 2.
func (r *registry) catchSignals() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "e2e: %v: removing every node, runtime and what they made\n", sig)
		r.mu.Lock()
		nodes := make([]*Node, 0, len(r.nodes))
		for n := range r.nodes {
			nodes = append(nodes, n)
		}
		r.mu.Unlock()
		for _, n := range nodes {
			if err := n.td.runAll(); err != nil {
				fmt.Fprintf(os.Stderr, "e2e: cleanup after interrupt: %v\n", err)
			}
		}
		os.Exit(2)
	}()
}
