//go:build e2e

// The real-runtime end-to-end test: containerd 1.6 + runc (Debian's) inside a simulated
// node's network namespace, pods made with crictl, the metaconceal CNI plugin in the
// conflist from conf/, the proxy with its host guard, the fake GCE metadata server as
// upstream. Every check runs curl from inside a sandbox's own network namespace.
package e2e

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
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/test/e2e/harness"
	"github.com/metaconceal/metaconceal/test/simnode"
)

const (
	concealedBody = "This metadata endpoint is concealed."
	metadataURL   = "http://169.254.169.254"
	proxyAddr     = "169.254.169.252:988"
	metadataIP6   = "fd20:ce::254" // GCE's metadata server on IPv6
	proxyAddr6    = "[fd20:ce::252]:988"
	podSubnet6    = "fd00:77::/64"
	proxyURL      = "http://" + proxyAddr
	tenantNS      = "e2e-tenant"
	excludedNS    = "kube-system"
	kubeEnvPath   = "/computeMetadata/v1/instance/attributes/kube-env"
	identityPath  = "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://e2e.example"
	tokenPath     = "/computeMetadata/v1/instance/service-accounts/default/token"
	projectIDPath = "/computeMetadata/v1/project/project-id"
)

// env is one simulated node with everything running on it.
type env struct {
	top        *testing.T // the top-level test, for cleanups that outlive a subtest
	td         *teardown
	node       *simnode.Node
	rt         *harness.Runtime
	bin        string
	dir        string
	stateDir   string
	pluginLog  string
	cniCalls   string
	proxyLog   string
	fakeLog    string // the fake metadata server's request log: who reached it directly
	proxyArgs  []string
	proxy      *process
	fakeGCE    *process
	kubeEnv    string // kube-env as the node (full access) reads it: the secret
	projectID  string
	secretLine string // the longest line of kube-env, searched for in every answer
}

func TestRealRuntime(t *testing.T) {
	testutil.RequirePrivileged(t, "containerd", "runc", "ctr", "iptables", "ip", "nsenter", "curl")
	ctx := context.Background()
	begin := time.Now()
	hostBefore := ourHostRules(t)
	e := setup(t, false)
	t.Logf("setup (pause image, containerd, fake GCE, proxy) took %s", time.Since(begin).Round(time.Millisecond))

	var normal pod
	var excludedIPs []string
	t.Run("normal pod: kube-env and identity concealed, project-id and token served", func(t *testing.T) {
		normal = e.newPod(t, tenantNS, "web-a", false)
		// The runtime pins sandbox netns under its own state dir, so its cleanup never
		// has to touch another runtime's /var/run/netns/cni-*.
		if !strings.HasPrefix(normal.netns, e.dir+"/") {
			t.Errorf("sandbox netns %s is outside the test's dir %s", normal.netns, e.dir)
		}
		t.Logf("sandbox netns %s", normal.netns)
		e.requireConcealed(t, normal.netns, metadataURL+kubeEnvPath)
		e.requireConcealed(t, normal.netns, metadataURL+identityPath)
		r := harness.MetadataGet(ctx, normal.netns, metadataURL+projectIDPath)
		if r.Status != 200 || r.Body != e.projectID {
			t.Errorf("project-id from the pod: want 200 %q, got %s", e.projectID, r)
		}
		r = harness.MetadataGet(ctx, normal.netns, metadataURL+tokenPath)
		if r.Status != 200 || !strings.Contains(r.Body, "access_token") {
			t.Errorf("token from the pod: want 200 with an access_token, got %s", r)
		}
		rec, err := state.Read(e.stateDir, normal.id, "eth0")
		if err != nil {
			t.Fatalf("state record of the pod: %v", err)
		}
		if rec.PodNamespace != tenantNS || rec.PodName != "web-a" {
			t.Errorf("state record names %s/%s, want %s/web-a", rec.PodNamespace, rec.PodName, tenantNS)
		}
	})

	t.Run("hostNetwork pod: CNI not called, full access", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "host-net", true)
		if p.sb.NetnsPath != "" {
			t.Fatalf("hostNetwork sandbox has its own netns %s", p.sb.NetnsPath)
		}
		if calls := e.cniCallsFor(t, p.id); len(calls) != 0 {
			t.Errorf("metaconceal was called for the hostNetwork sandbox: %q", calls)
		}
		if _, err := state.Read(e.stateDir, p.id, "eth0"); err == nil {
			t.Errorf("a state record exists for the hostNetwork sandbox")
		}
		// A hostNetwork sandbox shares the node's netns (containerd runs in it): check
		// that, then ask from the sandbox process's own netns.
		sandboxNetns := fmt.Sprintf("/proc/%d/ns/net", p.sb.PID)
		if same, err := sameNetns(sandboxNetns, e.node.Path); err != nil || !same {
			t.Fatalf("hostNetwork sandbox (pid %d) is not in the node netns: same=%v err=%v", p.sb.PID, same, err)
		}
		r := harness.MetadataGet(ctx, sandboxNetns, metadataURL+kubeEnvPath)
		if r.Status != 200 || r.Body != e.kubeEnv {
			t.Errorf("kube-env from the hostNetwork pod: want the full value, got %s", r)
		}
	})

	t.Run("excluded namespace: full access, exclusion logged", func(t *testing.T) {
		p := e.newPod(t, excludedNS, "system-agent", false)
		excludedIPs = append(excludedIPs, p.sb.IP)
		logs := readFile(t, e.pluginLog) + readFile(t, e.rt.LogPath)
		if !logMentions(logs, excludedNS, "exclu") {
			t.Errorf("no log line of the plugin (%s) or containerd names the exclusion of %s", e.pluginLog, excludedNS)
		}
		if rules := rulesOfOurs(t, p.netns); rules != "" {
			t.Errorf("the plugin put rules in the excluded pod's netns:\n%s", rules)
		}
		r := harness.MetadataGet(ctx, p.netns, metadataURL+kubeEnvPath)
		if r.Status != 200 || r.Body != e.kubeEnv {
			// With no rule in the pod, what else stands between it and the metadata
			// server is the proxy's node-wide guard, which redirects every pod.
			t.Errorf("kube-env from a pod in excluded namespace %s: want the full value, got %s "+
				"(the pod has no rule of ours; --host-guard redirected it to the proxy)", excludedNS, r)
		}
	})

	t.Run("pod removal: DEL twice, rules and record gone", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "short-lived", false)
		if _, err := state.Read(e.stateDir, p.id, "eth0"); err != nil {
			t.Fatalf("state record before removal: %v", err)
		}
		// Hold the pod's netns open past the runtime's own deletion of it, to see that
		// DEL (not the netns going away) removed the rules.
		held, err := os.Open(p.netns)
		if err != nil {
			t.Fatalf("open pod netns: %v", err)
		}
		defer held.Close()
		if rules := rulesOfOursIn(t, held); rules == "" {
			t.Fatalf("no metaconceal rule found in the pod's netns before removal; the check below would prove nothing")
		}
		if err := e.rt.RemovePod(ctx, p.id); err != nil {
			t.Fatalf("remove pod: %v", err)
		}
		calls := e.cniCallsFor(t, p.id)
		var dels []cniCall
		for _, c := range calls {
			if c.command == "DEL" {
				dels = append(dels, c)
			}
			if c.rc != "0" {
				t.Errorf("metaconceal %s exited %s", c.command, c.rc)
			}
		}
		if len(dels) != 2 {
			t.Fatalf("want 2 DEL calls, got %d: %+v", len(dels), calls)
		}
		if dels[0].netns != p.netns || dels[1].netns != "" {
			t.Errorf("DEL netns: want %q then empty, got %q then %q", p.netns, dels[0].netns, dels[1].netns)
		}
		if _, err := state.Read(e.stateDir, p.id, "eth0"); err == nil {
			t.Errorf("state record still there after removal")
		}
		if rules := rulesOfOursIn(t, held); rules != "" {
			t.Errorf("rules of ours left in the pod's netns after DEL:\n%s", rules)
		}
		if _, err := os.Stat(p.netns); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("sandbox netns %s still there: %v", p.netns, err)
		}
	})

	t.Run("audit line names the pod", func(t *testing.T) {
		if normal.id == "" {
			t.Fatal("the normal pod was not created")
		}
		lines := matchingLines(readFile(t, e.proxyLog), tenantNS, "web-a", "kube-env")
		if len(lines) == 0 {
			t.Errorf("no proxy log line names %s, web-a and kube-env; log:\n%s", tenantNS, harness.Tail(e.proxyLog, 20))
		} else {
			t.Logf("audit line: %s", lines[0])
		}
	})

	var attacker pod
	t.Run("attack: CAP_NET_ADMIN pod flushes its own tables", func(t *testing.T) {
		attacker = e.newPod(t, tenantNS, "attacker", false)
		e.requireConcealed(t, attacker.netns, metadataURL+kubeEnvPath)
		flushAll(ctx, attacker.netns)
		if rules := rulesOfOurs(t, attacker.netns); rules != "" {
			t.Fatalf("flush left rules in the pod's netns, the attack did not happen:\n%s", rules)
		}
		e.requireConcealed(t, attacker.netns, metadataURL+kubeEnvPath)
		e.requireConcealed(t, attacker.netns, metadataURL+identityPath)
	})

	t.Run("attack: other ports and protocols to the metadata IP", func(t *testing.T) {
		if normal.id == "" || attacker.id == "" {
			t.Fatal("the normal and the attacker pod are needed")
		}
		tcp, err := harness.ListenTCPWitness(e.node.Path, "169.254.169.254:8080")
		if err != nil {
			t.Fatal(err)
		}
		defer tcp.Close()
		udp, err := harness.ListenUDPWitness(e.node.Path, "169.254.169.254:53")
		if err != nil {
			t.Fatal(err)
		}
		defer udp.Close()
		// Controls: from the node each probe does get an answer, so a failure from the
		// pod means the pod was stopped, not that the probe cannot see an answer.
		if r := harness.Curl(ctx, e.node.Path, "http://169.254.169.254:8080/"); !strings.Contains(r.Body, "REACHED") {
			t.Fatalf("control: TCP 8080 from the node not answered: %s", r)
		}
		if err := harness.UDPExchange(e.node.Path, "169.254.169.254:53", 2*time.Second); err != nil {
			t.Fatalf("control: UDP 53 from the node not answered: %v", err)
		}
		if err := harness.Ping(e.node.Path, "169.254.169.254", 2*time.Second); err != nil {
			t.Fatalf("control: ping from the node not answered: %v", err)
		}
		tcpBefore, udpBefore := tcp.Hits(), udp.Hits()
		for _, p := range []pod{normal, attacker} {
			if p.id == "" {
				continue
			}
			if r := harness.Curl(ctx, p.netns, "http://169.254.169.254:8080/"); r.Exit == 0 || strings.Contains(r.Body, "REACHED") {
				t.Errorf("%s: TCP 8080 to the metadata IP got through: %s", p.name, r)
			}
			if err := harness.UDPExchange(p.netns, "169.254.169.254:53", 2*time.Second); err == nil {
				t.Errorf("%s: UDP 53 to the metadata IP was answered", p.name)
			}
			if err := harness.Ping(p.netns, "169.254.169.254", 2*time.Second); err == nil {
				t.Errorf("%s: ICMP echo to the metadata IP was answered", p.name)
			}
		}
		if n := tcp.Hits() - tcpBefore; n != 0 {
			t.Errorf("%d TCP connection(s) from pods reached 169.254.169.254:8080", n)
		}
		if n := udp.Hits() - udpBefore; n != 0 {
			t.Errorf("%d UDP datagram(s) from pods reached 169.254.169.254:53", n)
		}
	})

	t.Run("attack: other spellings of the metadata address", func(t *testing.T) {
		if normal.id == "" || attacker.id == "" {
			t.Fatal("the normal and the attacker pod are needed")
		}
		if out, err := simnode.Run(ctx, "nsenter", "--net="+normal.netns, "ip", "-6", "addr", "show", "scope", "global"); err == nil && strings.TrimSpace(out) == "" {
			t.Log("the pod has no global IPv6 address; ::ffff:169.254.169.254 is still tried: a dual-stack socket sends it as IPv4")
		}
		cases := []struct {
			name string
			args []string
		}{
			{"IPv4-mapped IPv6", []string{"-g", "http://[::ffff:169.254.169.254]" + kubeEnvPath}},
			{"decimal IP", []string{"http://2852039166" + kubeEnvPath}},
			{"hex IP", []string{"http://0xa9fea9fe" + kubeEnvPath}},
		}
		for _, p := range []pod{normal, attacker} {
			for _, c := range cases {
				r := harness.MetadataGet(ctx, p.netns, "", c.args...)
				e.requireNoSecret(t, p.name+" "+c.name, r)
				if r.Status == 200 {
					t.Errorf("%s %s: 200 for kube-env: %s", p.name, c.name, r)
				}
				t.Logf("%s %s: %s", p.name, c.name, r)
			}
			// metadata.google.internal resolved through the pod's own hosts file, with the
			// entry GKE puts there, as a container of the pod would resolve it.
			hosts, err := e.rt.AddMetadataHost(p.id)
			if err != nil {
				t.Errorf("%s: %v", p.name, err)
				continue
			}
			for _, path := range []string{kubeEnvPath, identityPath} {
				r := harness.MetadataGetWithHosts(ctx, p.netns, hosts, "http://metadata.google.internal"+path)
				e.requireNoSecret(t, p.name+" metadata.google.internal", r)
				// A 403 from the proxy also proves the name resolved (no DNS answers it here).
				if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
					t.Errorf("%s http://metadata.google.internal%s via %s: want 403 %q, got %s", p.name, path, hosts, concealedBody, r)
				}
			}
		}
	})

	t.Run("attack: bypass paths against the metadata IP and the proxy", func(t *testing.T) {
		if normal.id == "" || attacker.id == "" {
			t.Fatal("the normal and the attacker pod are needed")
		}
		paths := []struct {
			path  string
			extra []string
		}{
			{"//computeMetadata/v1/instance/attributes/kube-env", nil},
			{"/computeMetadata/v1//instance/attributes//kube-env", nil},
			{"/computeMetadata/v1/./instance/attributes/./kube-env", nil},
			{"/computeMetadata/v1/instance/attributes/x/../kube-env", nil},
			{"/computeMetadata/v1/instance/attributes%2Fkube-env", nil},
			{"/computeMetadata/v1/instance/attributes/kube%2denv", nil},
			{"/computeMetadata/v1/instance/attributes/x/%2e%2e/kube-env", nil},
			{"/computeMetadata/v1/instance/attributes/KUBE-ENV", nil},
			{"/computeMetadata/v1/instance/attributes/kube-env/", nil},
			{"/computeMetadata/v1/instance/attributes/kube-env?alt=json", nil},
			{"/computeMetadata/v1beta1/instance/attributes/kube-env", nil},
			{"/0.1/meta-data/attributes/kube-env", nil},
			{"/computeMetadata/v1/instance/?recursive=true", nil},
			{"/computeMetadata/v1/instance/attributes/?recursive=true", nil},
			{"/computeMetadata/v1/?recursive=true&alt=json", nil},
			{"/computeMetadata/v1/instance/?%72ecursive=true", nil},
			{"/computeMetadata/v1/instance/attributes/kube-env", []string{"-H", "X-Forwarded-For: 10.0.0.1"}},
			{"/computeMetadata/v1/instance/service-accounts/default/../../attributes/kube-env", []string{"--path-as-is"}},
		}
		for _, base := range []string{metadataURL, proxyURL} {
			for _, p := range paths {
				args := append([]string{"--path-as-is"}, p.extra...)
				r := harness.MetadataGet(ctx, normal.netns, base+p.path, args...)
				label := base + p.path + " " + strings.Join(p.extra, " ")
				e.requireNoSecret(t, label, r)
				if r.Status < 300 {
					t.Errorf("%s: want concealed or denied, got %s", label, r)
				}
			}
		}
	})

	t.Run("50 pods in parallel, 8 at a time", func(t *testing.T) {
		before := rulesOfOurs(t, e.node.Path)
		const total, parallel = 50, 8
		ids := make([]string, total)
		errs := make([]error, total)
		start := time.Now()
		forEach(total, parallel, func(i int) {
			p, err := e.startPod(ctx, tenantNS, fmt.Sprintf("bulk-%02d", i))
			ids[i], errs[i] = p.id, err
			if err != nil {
				return
			}
			r := harness.MetadataGet(ctx, p.netns, metadataURL+kubeEnvPath)
			if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
				errs[i] = fmt.Errorf("pod bulk-%02d: kube-env not concealed: %s", i, r)
			}
		})
		added := time.Since(start)
		reportErrors(t, "add", errs)
		start = time.Now()
		delErrs := make([]error, total)
		forEach(total, parallel, func(i int) {
			if ids[i] != "" {
				delErrs[i] = e.rt.RemovePod(ctx, ids[i])
			}
		})
		removed := time.Since(start)
		t.Logf("measured: %d pods added (runp + inspectp + one curl each) in %s, removed (stopp + rmp) in %s, %d at a time",
			total, added.Round(time.Millisecond), removed.Round(time.Millisecond), parallel)
		reportErrors(t, "remove", delErrs)
		recs, err := state.List(e.stateDir)
		if err != nil {
			t.Fatalf("list state records: %v", err)
		}
		for _, rec := range recs {
			for _, id := range ids {
				if rec.ContainerID == id {
					t.Errorf("state record of removed pod %s/%s left", rec.PodNamespace, rec.PodName)
				}
			}
		}
		if after := rulesOfOurs(t, e.node.Path); after != before {
			t.Errorf("node rules changed across 50 pods added and removed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		for i, id := range ids {
			if id == "" {
				continue
			}
			var adds, dels int
			for _, c := range e.cniCallsFor(t, id) {
				if c.rc != "0" {
					t.Errorf("bulk-%02d: metaconceal %s exited %s", i, c.command, c.rc)
				}
				switch c.command {
				case "ADD":
					adds++
				case "DEL":
					dels++
				}
			}
			if adds != 1 || dels < 1 {
				t.Errorf("bulk-%02d: want 1 ADD and at least 1 DEL, got %d and %d", i, adds, dels)
			}
		}
		logs := readFile(t, e.pluginLog) + readFile(t, e.rt.LogPath)
		for _, bad := range []string{"xtables lock", "holding the xtables", "Resource temporarily unavailable"} {
			if strings.Contains(logs, bad) {
				t.Errorf("iptables lock trouble in the logs: %q", bad)
			}
		}
	})

	t.Run("proxy stopped: fail closed; restarted: pods work again", func(t *testing.T) {
		if normal.id == "" || attacker.id == "" {
			t.Fatal("the normal and the attacker pod are needed")
		}
		if err := e.proxy.stop(syscall.SIGTERM, 15*time.Second); err != nil {
			t.Fatalf("stop proxy: %v", err)
		}
		logBefore := len(readFile(t, e.fakeLog))
		for _, p := range []pod{normal, attacker} {
			r := harness.MetadataGet(ctx, p.netns, metadataURL+kubeEnvPath)
			e.requireNoSecret(t, p.name+" with the proxy down", r)
			if r.Exit != 7 {
				t.Errorf("%s with the proxy down: want connection refused (curl exit 7), got %s", p.name, r)
			}
			r = harness.MetadataGet(ctx, p.netns, metadataURL+projectIDPath)
			if r.Exit != 7 {
				t.Errorf("%s with the proxy down: project-id must fail closed too, got %s", p.name, r)
			}
		}
		if direct := directRequests(readFile(t, e.fakeLog)[logBefore:], nil); len(direct) != 0 {
			t.Errorf("with the proxy down, pods reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
		}
		e.proxy = e.startProxy(t)
		for _, p := range []pod{normal, attacker} {
			e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
			r := harness.MetadataGet(ctx, p.netns, metadataURL+projectIDPath)
			if r.Status != 200 || r.Body != e.projectID {
				t.Errorf("%s after the proxy restart: project-id want 200 %q, got %s", p.name, e.projectID, r)
			}
		}
	})

	t.Run("remove-host-guard leaves no rule of ours in the node", func(t *testing.T) {
		if rules := rulesOfOurs(t, e.node.Path); rules == "" {
			t.Fatalf("no guard rule in the node netns before removal; the check below would prove nothing")
		}
		if err := e.proxy.stop(syscall.SIGTERM, 15*time.Second); err != nil {
			t.Fatalf("stop proxy: %v", err)
		}
		out, err := e.node.Exec(ctx, filepath.Join(e.bin, "metaconceal-proxy"), append(e.proxyArgs, "--remove-host-guard")...)
		if err != nil {
			t.Fatalf("metaconceal-proxy --remove-host-guard: %v (%s)", err, out)
		}
		if rules := rulesOfOurs(t, e.node.Path); rules != "" {
			t.Errorf("rules of ours left in the node netns:\n%s", rules)
		}
	})

	t.Run("no concealed pod ever reached the metadata server directly", func(t *testing.T) {
		// Every request of a pod that metaconceal covers arrives from the proxy's
		// address; one from a pod IP went around it. The excluded pod may go direct.
		log := readFile(t, e.fakeLog)
		if !strings.Contains(log, "remote=") {
			t.Fatalf("the fake server logged no request with its client address; this check would prove nothing:\n%s", harness.Tail(e.fakeLog, 5))
		}
		if direct := directRequests(log, excludedIPs); len(direct) != 0 {
			t.Errorf("requests from pod IPs reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
		}
	})

	t.Run("machine's own netns untouched", func(t *testing.T) {
		if after := ourHostRules(t); after != hostBefore {
			t.Errorf("the machine's own iptables changed:\nbefore:\n%s\nafter:\n%s", hostBefore, after)
		}
	})
	t.Logf("whole run before cleanup: %s", time.Since(begin).Round(time.Millisecond))
}

// setup builds the node and starts everything on it; t.Cleanup undoes it all, in
// reverse order, also when a later step fails.
func setup(t *testing.T, dualStack bool) *env {
	t.Helper()
	ctx := context.Background()
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := testutil.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{top: t, bin: bin, td: &teardown{}}
	e.td.catchSignals(t)
	for _, b := range []string{"metaconceal", "metaconceal-proxy", "fake-gce-metadata", "bridge", "host-local", "loopback", "crictl"} {
		if _, err := os.Stat(filepath.Join(e.bin, b)); err != nil {
			t.Fatalf("%s missing in %s (run `make build`): %v", b, e.bin, err)
		}
	}
	var nodeAddrs []string
	if dualStack {
		nodeAddrs = []string{metadataIP6 + "/128", "fd20:ce::252/128"}
	}
	node, err := simnode.New("mc-e2e", nodeAddrs...)
	if err != nil {
		t.Fatalf("create node netns: %v", err)
	}
	e.node = node
	e.td.add(t, "delete node netns", node.Close)
	// A short dir of our own: containerd's socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "mc-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	e.dir = dir
	e.td.add(t, "remove "+dir, func() error { return os.RemoveAll(dir) })
	e.stateDir = filepath.Join(dir, "metaconceal-state")
	e.pluginLog = filepath.Join(dir, "metaconceal-plugin.log")
	e.cniCalls = filepath.Join(dir, "cni-calls.log")
	e.proxyLog = filepath.Join(dir, "proxy.log")

	e.fakeLog = filepath.Join(dir, "fake-gce.log")
	fakeListen := "169.254.169.254:80"
	if dualStack {
		fakeListen += ",[" + metadataIP6 + "]:80"
	}
	e.fakeGCE = startInNode(t, node, e.fakeLog,
		filepath.Join(e.bin, "fake-gce-metadata"), "--listen", fakeListen, "--log-requests")
	e.td.add(t, "stop fake GCE server", func() error { return e.fakeGCE.stop(syscall.SIGTERM, 5*time.Second) })
	waitFor(t, "fake GCE metadata server", func() error {
		r := harness.MetadataGet(ctx, node.Path, metadataURL+projectIDPath)
		if r.Status != 200 {
			return fmt.Errorf("%s", r)
		}
		e.projectID = r.Body
		return nil
	})
	r := harness.MetadataGet(ctx, node.Path, metadataURL+kubeEnvPath)
	if r.Status != 200 || strings.TrimSpace(r.Body) == "" {
		t.Fatalf("kube-env from the node: %s", r)
	}
	e.kubeEnv = r.Body
	for _, line := range strings.Split(e.kubeEnv, "\n") {
		if len(line) > len(e.secretLine) {
			e.secretLine = line
		}
	}

	proxyListen := proxyAddr
	if dualStack {
		proxyListen += "," + proxyAddr6
	}
	e.proxyArgs = []string{"--listen", proxyListen, "--upstream", metadataURL,
		"--metrics-listen", "127.0.0.1:9988", "--state-dir", e.stateDir}
	e.td.add(t, "remove the host guard", func() error {
		// Idempotent: the last subtest already did it when all went well. The proxies
		// started are stopped first (their own steps come later, so run earlier).
		if out, err := node.Exec(context.Background(), filepath.Join(e.bin, "metaconceal-proxy"), append(e.proxyArgs, "--remove-host-guard")...); err != nil {
			return fmt.Errorf("metaconceal-proxy --remove-host-guard: %w (%s)", err, out)
		}
		return nil
	})
	e.proxy = e.startProxy(t)

	pauseBin, err := harness.BuildPauseBinary(ctx, root, dir)
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "pause.tar")
	if err := harness.WritePauseArchive(pauseBin, archive, harness.PauseImageRef); err != nil {
		t.Fatal(err)
	}

	// METACONCEAL_E2E_CONF_DIR points the test at other conflists than conf/'s.
	confRoot := filepath.Join(root, "conf")
	if d := os.Getenv("METACONCEAL_E2E_CONF_DIR"); d != "" {
		confRoot = d
	}
	example, err := harness.FindExampleConflist(confRoot, dualStack)
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := os.ReadFile(example)
	if err != nil {
		t.Fatal(err)
	}
	network := "mc-e2e-" + simnode.RandomSuffix()
	subnets := []string{podSubnet}
	if dualStack {
		subnets = append(subnets, podSubnet6)
	}
	conflist, err := harness.RewriteConflist(shipped, harness.ConflistOptions{
		Name: network, Bridge: "mce2e0", Subnets: subnets,
		IPAMDir: filepath.Join(dir, "ipam"), StateDir: e.stateDir, LogFile: e.pluginLog,
		Exclude: []string{excludedNS},
		// containerd 1.6's libcni reads results up to spec 1.0.0.
		CNIVersion: "1.0.0",
	})
	if err != nil {
		t.Fatalf("%s: %v", example, err)
	}
	t.Logf("conflist from %s:\n%s", example, conflist)

	// metaconceal is called through a recorder that logs each call (command, container
	// id, netns, exit code) before handing over stdin and stdout unchanged.
	recorder := filepath.Join(dir, "metaconceal-recorder")
	script := fmt.Sprintf("#!/bin/sh\n\"$(dirname \"$0\")/metaconceal.real\" \"$@\"\nrc=$?\necho \"$CNI_COMMAND $CNI_CONTAINERID netns=$CNI_NETNS rc=$rc\" >> %q\nexit $rc\n",
		e.cniCalls)
	if err := os.WriteFile(recorder, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	runtimeDir := filepath.Join(dir, "rt")
	if err := os.MkdirAll(runtimeDir, 0o755); err != nil {
		t.Fatal(err)
	}
	rt, err := harness.Start(ctx, harness.Config{
		Node: node, Dir: runtimeDir,
		CNIBinaries: map[string]string{
			"bridge":           filepath.Join(e.bin, "bridge"),
			"host-local":       filepath.Join(e.bin, "host-local"),
			"loopback":         filepath.Join(e.bin, "loopback"),
			"metaconceal":      recorder,
			"metaconceal.real": filepath.Join(e.bin, "metaconceal"),
		},
		CNIConflist: conflist, NetworkName: network,
		PauseArchive: archive, CrictlPath: filepath.Join(e.bin, "crictl"),
	})
	if err != nil {
		t.Fatal(err)
	}
	e.rt = rt
	e.td.add(t, "stop the runtime and remove its leftovers", rt.Close)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", harness.Tail(rt.LogPath, 40))
			t.Logf("proxy log tail:\n%s", harness.Tail(e.proxyLog, 20))
			t.Logf("plugin log tail:\n%s", harness.Tail(e.pluginLog, 20))
		}
	})
	return e
}

func (e *env) startProxy(t *testing.T) *process {
	t.Helper()
	p := startInNode(t, e.node, e.proxyLog, filepath.Join(e.bin, "metaconceal-proxy"), append(e.proxyArgs, "--host-guard")...)
	// Usually stopped by a subtest; this also covers a start that fails below. On the
	// top-level test: a proxy restarted inside a subtest must outlive that subtest.
	e.td.add(e.top, "stop metaconceal-proxy", func() error { return p.stop(syscall.SIGTERM, 15*time.Second) })
	waitFor(t, "metaconceal-proxy", func() error {
		if p.exited() {
			return fmt.Errorf("exited: %s", harness.Tail(e.proxyLog, 10))
		}
		r := harness.MetadataGet(context.Background(), e.node.Path, proxyURL+projectIDPath)
		if r.Status != 200 {
			return fmt.Errorf("%s", r)
		}
		return nil
	})
	return p
}

type pod struct {
	id, namespace, name string
	netns               string // the sandbox's netns path; empty for hostNetwork
	sb                  harness.Sandbox
}

func (e *env) startPod(ctx context.Context, namespace, name string) (pod, error) {
	return e.startPodNet(ctx, namespace, name, false)
}

func (e *env) startPodNet(ctx context.Context, namespace, name string, hostNetwork bool) (pod, error) {
	id, err := e.rt.RunPod(ctx, harness.PodSpec{Name: name, Namespace: namespace, HostNetwork: hostNetwork})
	if err != nil {
		return pod{id: id}, err
	}
	sb, err := e.rt.Inspect(ctx, id)
	if err != nil {
		return pod{id: id}, err
	}
	if !hostNetwork && sb.NetnsPath == "" {
		return pod{id: id}, fmt.Errorf("sandbox %s/%s has no netns path", namespace, name)
	}
	return pod{id: id, namespace: namespace, name: name, netns: sb.NetnsPath, sb: sb}, nil
}

func (e *env) newPod(t *testing.T, namespace, name string, hostNetwork bool) pod {
	t.Helper()
	p, err := e.startPodNet(context.Background(), namespace, name, hostNetwork)
	if err != nil {
		t.Fatalf("pod %s/%s: %v\ncontainerd log:\n%s", namespace, name, err, harness.Tail(e.rt.LogPath, 15))
	}
	return p
}

func (e *env) requireConcealed(t *testing.T, netns, url string) {
	t.Helper()
	r := harness.MetadataGet(context.Background(), netns, url)
	e.requireNoSecret(t, url, r)
	// The proxy's body is the one line; a trailing newline is tolerated, nothing else.
	if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
		t.Errorf("%s: want 403 %q, got %s", url, concealedBody, r)
	}
}

func (e *env) requireNoSecret(t *testing.T, label string, r harness.CurlResult) {
	t.Helper()
	if strings.Contains(r.Body, e.secretLine) || strings.Contains(r.Body, `"kube-env"`) {
		t.Errorf("%s: kube-env content leaked: %s", label, r)
	}
}

type cniCall struct{ command, netns, rc string }

var cniCallLine = regexp.MustCompile(`^(\S+) (\S+) netns=(\S*) rc=(\d+)$`)

func (e *env) cniCallsFor(t *testing.T, id string) []cniCall {
	t.Helper()
	var calls []cniCall
	for _, line := range strings.Split(readFile(t, e.cniCalls), "\n") {
		m := cniCallLine.FindStringSubmatch(line)
		if m != nil && m[2] == id {
			calls = append(calls, cniCall{command: m[1], netns: m[3], rc: m[4]})
		}
	}
	return calls
}

// ourRule matches an iptables-save line that belongs to metaconceal: anything naming
// the metadata or proxy address, or a chain of ours.
var ourRule = regexp.MustCompile(`(?i)169\.254\.169\.25[24]|fd20:ce::25[24]|metaconceal|\bMC-`)

func filterOurs(dump string) string {
	var out []string
	for _, line := range strings.Split(dump, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		if ourRule.MatchString(line) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// rulesOfOurs returns our lines in every iptables backend's dump of the netns at path.
func rulesOfOurs(t *testing.T, netnsPath string) string {
	t.Helper()
	var all []string
	for _, tool := range saveTools() {
		out, err := simnode.Run(context.Background(), "nsenter", "--net="+netnsPath, tool)
		if err != nil {
			t.Fatalf("%s in %s: %v", tool, netnsPath, err)
		}
		if ours := filterOurs(out); ours != "" {
			all = append(all, tool+":\n"+ours)
		}
	}
	return strings.Join(all, "\n")
}

// rulesOfOursIn is rulesOfOurs for a netns held open by f (whose bind mount may be gone).
func rulesOfOursIn(t *testing.T, f *os.File) string {
	t.Helper()
	var all []string
	for _, tool := range saveTools() {
		cmd := exec.Command("nsenter", "--net=/proc/self/fd/3", tool)
		cmd.ExtraFiles = []*os.File{f}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s in held netns: %v", tool, err)
		}
		if ours := filterOurs(string(out)); ours != "" {
			all = append(all, tool+":\n"+ours)
		}
	}
	return strings.Join(all, "\n")
}

func saveTools() []string {
	var tools []string
	for _, tool := range []string{"iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if _, err := exec.LookPath(tool); err == nil {
			tools = append(tools, tool)
		}
	}
	return tools
}

// ourHostRules reads (never changes) the machine's own iptables, for the final check
// that nothing of ours ever landed there.
func ourHostRules(t *testing.T) string {
	t.Helper()
	var all []string
	for _, tool := range saveTools() {
		out, err := simnode.Run(context.Background(), tool)
		if err != nil {
			t.Fatalf("%s: %v", tool, err)
		}
		all = append(all, tool+":\n"+filterOurs(out))
	}
	return strings.Join(all, "\n")
}

// teardown runs each cleanup step once, newest first: from t.Cleanup normally, or from
// a SIGINT/SIGTERM handler when the run is interrupted (Ctrl-C on `make e2e`, a CI
// cancel), since Go runs no t.Cleanup for a test binary that is killed.
type teardown struct {
	mu    sync.Mutex
	steps []*teardownStep
}

type teardownStep struct {
	once sync.Once
	fn   func() error
	err  error
}

func (s *teardownStep) run() error {
	s.once.Do(func() { s.err = s.fn() })
	return s.err
}

func (td *teardown) add(t *testing.T, what string, fn func() error) {
	s := &teardownStep{fn: fn}
	td.mu.Lock()
	td.steps = append(td.steps, s)
	td.mu.Unlock()
	t.Cleanup(func() {
		if err := s.run(); err != nil {
			t.Errorf("cleanup: %s: %v", what, err)
		}
	})
}

func (td *teardown) runAll() {
	td.mu.Lock()
	steps := slices.Clone(td.steps)
	td.mu.Unlock()
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].run(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: cleanup after interrupt: %v\n", err)
		}
	}
}

func (td *teardown) catchSignals(t *testing.T) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case sig := <-sigs:
			fmt.Fprintf(os.Stderr, "e2e: %v: removing the node, the runtime and everything they made\n", sig)
			td.runAll()
			os.Exit(2)
		case <-done:
		}
	}()
	t.Cleanup(func() {
		signal.Stop(sigs)
		close(done)
	})
}

// process is a program started inside the node netns (`ip netns exec` execs it, so the
// pid is the program's own).
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func startInNode(t *testing.T, node *simnode.Node, logPath, name string, args ...string) *process {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", node.Name, name}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) stop(sig syscall.Signal, grace time.Duration) error {
	if p.exited() {
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

func waitFor(t *testing.T, what string, ready func() error) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = ready(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s not ready after 15s: %v", what, err)
}

func forEach(n, parallel int, fn func(i int)) {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			fn(i)
		}(i)
	}
	wg.Wait()
}

// podSubnet is the conflist's pod range; the fake server logs "remote=IP:port".
const podSubnet = "10.77.0.0/24"

var remoteInPodSubnet = regexp.MustCompile(`remote=(10\.77\.0\.\d+|\[fd00:77::[0-9a-f:]+\]):\d+`)

// directRequests returns the request-log lines of the fake metadata server whose client
// is a pod IP not in allowed.
func directRequests(log string, allowed []string) []string {
	var out []string
	for _, line := range strings.Split(log, "\n") {
		m := remoteInPodSubnet.FindStringSubmatch(line)
		if m != nil && !slices.Contains(allowed, m[1]) {
			out = append(out, line)
		}
	}
	return out
}

// reportErrors fails the test with the count of errors and the first three of them.
func reportErrors(t *testing.T, what string, errs []error) {
	t.Helper()
	var failed []error
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) == 0 {
		return
	}
	shown := failed[:min(3, len(failed))]
	t.Errorf("%s: %d of %d failed; first: %v", what, len(failed), len(errs), errors.Join(shown...))
}

// sameNetns reports whether two netns files (bind mount or /proc/PID/ns/net) are the
// same namespace.
func sameNetns(a, b string) (bool, error) {
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := syscall.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(data)
}

func matchingLines(text string, words ...string) []string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		ok := true
		for _, w := range words {
			if !strings.Contains(line, w) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			out = append(out, line)
		}
	}
	return out
}

func logMentions(text, namespace, word string) bool {
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, namespace) && strings.Contains(strings.ToLower(line), word) {
			return true
		}
	}
	return false
}
