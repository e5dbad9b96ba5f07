package bypass

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	mctestutil "github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
	"github.com/metaconceal/metaconceal/pkg/selftest"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// podRules installs in the pod's netns the rules the CNI plugin renders for port 80:
// DNAT to the proxy, REJECT of everything else to the metadata address.
func (w *world) podRules(p pod) {
	w.t.Helper()
	for _, args := range [][]string{
		{"-t", "nat", "-A", "OUTPUT", "-d", "169.254.169.254/32", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", proxyAddr.String()},
		{"-A", "OUTPUT", "-d", "169.254.169.254/32", "-j", "REJECT"},
	} {
		if _, err := simnode.Run(context.Background(), "ip", append([]string{"netns", "exec", p.name, "iptables"}, args...)...); err != nil {
			w.t.Fatal(err)
		}
	}
}

// addPtpPod makes a pod as the ptp CNI plugin (GKE's classic datapath) does: eth0
// with a /32, a link route to the gateway and a default route via it; on the node, the
// gateway's address on the host veth and a /32 route to the pod through it. The node
// reaches no other address of the pod's subnet through that veth.
func (w *world) addPtpPod(short, ip, gw string) pod {
	w.t.Helper()
	name, path, err := w.node.NewPodNS("mc-byp-" + short)
	if err != nil {
		w.t.Fatal(err)
	}
	p := pod{name: name, path: path, hostIf: "mcv" + short, gw: gw}
	p.ip = mustAddr(w.t, ip)
	w.ip("link", "add", p.hostIf, "type", "veth", "peer", "name", "eth0", "netns", name)
	w.ip("addr", "add", gw+"/32", "dev", p.hostIf)
	w.ip("link", "set", p.hostIf, "up")
	w.ip("route", "add", ip+"/32", "dev", p.hostIf)
	for _, args := range [][]string{
		{"addr", "add", ip + "/32", "dev", "eth0"},
		{"link", "set", "eth0", "up"},
		{"route", "add", gw + "/32", "dev", "eth0", "scope", "link"},
		{"route", "add", "default", "via", gw, "dev", "eth0"},
	} {
		if _, err := simnode.Run(context.Background(), "ip", append([]string{"-n", name}, args...)...); err != nil {
			w.t.Fatal(err)
		}
	}
	return p
}

// selftest runs the real `metaconceal-install selftest` in the node netns (as the node
// agent runs there, hostNetwork) on the netns at podNetns, and returns its one line of
// output and exit code. The output must never carry a concealed value.
func (w *world) selftest(podNetns string) (string, int) {
	w.t.Helper()
	bin, err := mctestutil.BinDir()
	if err != nil {
		w.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := w.node.Command(ctx, filepath.Join(bin, "metaconceal-install"), "selftest",
		"--pod-netns", podNetns, "--state-dir", w.stateDir, "--proxy", proxyAddr.String())
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		w.t.Fatalf("metaconceal-install selftest: %v", err)
	}
	out := stdout.String()
	w.t.Logf("metaconceal-install selftest --pod-netns %s: exit %d: %s%s", podNetns, code, out, stderr.String())
	for _, secret := range []string{fakegce.KubeEnvMarker, fakegce.IdentityTokenMarker} {
		if strings.Contains(out+stderr.String(), secret) {
			w.t.Fatalf("the self-test printed a concealed value (%s)", secret)
		}
	}
	if strings.Count(out, "\n") != 1 {
		w.t.Errorf("want exactly one line of output, got %q", out)
	}
	return out, code
}

// assertNoProbeRule checks that the probe took its transient rule away from the pod.
func (w *world) assertNoProbeRule(p pod) {
	w.t.Helper()
	out, err := simnode.Run(context.Background(), "ip", "netns", "exec", p.name, "iptables-save")
	if err != nil {
		w.t.Fatal(err)
	}
	if strings.Contains(out, "metaconceal selftest") {
		w.t.Errorf("the probe's rule stayed in the pod netns:\n%s", out)
	}
}

// makeGuardInert puts rules ahead of the guard in the node netns, as datapaths that
// bypass netfilter's usual path do in effect (docs/datapath.md): raw-table NOTRACK of
// traffic to and from the metadata address (nat, and so the guard's DNAT, never sees
// it) and filter ACCEPTs first in INPUT and OUTPUT (as Calico's insert mode accepts
// workload traffic before any other rule).
func (w *world) makeGuardInert() {
	w.t.Helper()
	for _, args := range [][]string{
		{"-t", "raw", "-I", "PREROUTING", "1", "-d", "169.254.169.254/32", "-j", "NOTRACK"},
		{"-t", "raw", "-I", "OUTPUT", "1", "-s", "169.254.169.254/32", "-j", "NOTRACK"},
		{"-I", "INPUT", "1", "-d", "169.254.169.254/32", "-j", "ACCEPT"},
		{"-I", "OUTPUT", "1", "-s", "169.254.169.254/32", "-j", "ACCEPT"},
	} {
		if _, err := w.node.Exec(context.Background(), "iptables", args...); err != nil {
			w.t.Fatal(err)
		}
	}
}

// TestSelftestSeesGuardAndBypass: `metaconceal-install selftest` from a concealed pod
// (bridged with its own rules, and routed as ptp makes it, its rules flushed) says the guard is effective while the guard
// stands, and BYPASSED once rules ahead of it make it inert; the raw attack then
// really reads kube-env, which the self-test itself never does. A netns that does not
// exist is a run that could not be made (exit 1).
func TestSelftestSeesGuardAndBypass(t *testing.T) {
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	w := newWorld(t)
	bridged := w.addPod("stb", "10.251.0.4")
	routed := w.addPtpPod("stp", "10.252.7.5", "10.252.7.1")
	pods := []pod{bridged, routed}
	for _, p := range pods {
		w.record(p, "")
	}
	// The bridged pod has the plugin's rules; the routed one has none (flushed, as a
	// pod with CAP_NET_ADMIN can): then nothing in the pod stops its kernel's resets
	// of the probe's connection but the probe's own transient rule.
	w.podRules(bridged)
	if recs, err := state.List(w.stateDir); err != nil || len(recs) != 2 {
		t.Fatalf("state records: %v, %v", recs, err)
	}
	w.installGuard()

	for _, p := range pods {
		out, code := w.selftest(p.path)
		if code != 0 || !strings.HasPrefix(out, "selftest: guard effective") || !strings.Contains(out, "reached the metaconceal proxy") {
			t.Errorf("%s with the guard: exit %d %q; want 0 and the proxy reached", p.name, code, out)
		}
		if !strings.Contains(out, "team/"+p.name) {
			t.Errorf("%s: the line does not name the pod from its state record: %q", p.name, out)
		}
		w.assertNoProbeRule(p)
	}

	w.makeGuardInert()
	for _, p := range pods {
		out, code := w.selftest(p.path)
		if code != 3 || !strings.HasPrefix(out, "selftest: guard BYPASSED") {
			t.Errorf("%s with the guard inert: exit %d %q; want 3 and BYPASSED", p.name, code, out)
		}
		w.assertNoProbeRule(p)
	}
	// The bypass the self-test reported is real: the raw attacker reads kube-env.
	if got := w.raw(bridged, "10.251.0.78"); !strings.Contains(got, fakegce.KubeEnvMarker) {
		t.Errorf("with the guard inert, the raw attacker did not read kube-env: %q", firstLine(got))
	}

	out, code := w.selftest(filepath.Join(simnode.NetnsDir, "mc-byp-no-such-netns"))
	if code != 1 || !strings.HasPrefix(out, "selftest: could not run") {
		t.Errorf("missing netns: exit %d %q; want 1 and could not run", code, out)
	}
}

func mustAddr(t testing.TB, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// BenchmarkSelftest prints the cost of one probe (pkg/selftest.Run, as the node agent
// runs it each period): the proxy's control answer, entering the pod netns, the
// transient rule in and out (two iptables processes) and the raw exchange.
func BenchmarkSelftest(b *testing.B) {
	w := newWorld(b)
	p := w.addPtpPod("stx", "10.252.9.5", "10.252.9.1")
	w.installGuard()
	// The proxy is asked from the node netns, as the (hostNetwork) agent asks it.
	cfg := selftest.Config{Netns: p.path, Proxy: proxyAddr, ProxyNetns: w.node.Path}
	b.ResetTimer()
	for b.Loop() {
		res, err := selftest.Run(context.Background(), cfg)
		if err != nil || res.Verdict != selftest.Effective {
			b.Fatalf("probe: %+v %v", res, err)
		}
	}
}

// TestSelftestAgentReportsBypass: the node agent's parts as it wires them (the
// monitor probing from the node's concealed pods, the reporter on a node object of
// client-go's fake clientset): condition True and gauge 1 with the guard; after the
// guard is made inert, condition False with reason Bypassed, gauge 0, one Warning
// Event on the node; the gate check holds a gate that never opened.
func TestSelftestAgentReportsBypass(t *testing.T) {
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	w := newWorld(t)
	p := w.addPtpPod("sta", "10.252.8.5", "10.252.8.1")
	w.record(p, "")
	w.installGuard()

	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "sim"}})
	reg := prometheus.NewRegistry()
	rep := &nodegate.GuardReporter{Client: client, Node: "sim", Effective: nodegate.NewGuardGauge(reg), Log: w.log}
	m, err := selftest.NewMonitor(selftest.MonitorConfig{StateDir: w.stateDir, Interval: time.Minute,
		Probe: selftest.Config{Proxy: proxyAddr, ProxyNetns: w.node.Path}, Log: w.log})
	if err != nil {
		t.Fatal(err)
	}
	var opened atomic.Bool
	check := nodegate.GuardCheck(m, &opened)

	round := func(want corev1.ConditionStatus, reason string, gauge float64, events int) {
		t.Helper()
		o := m.Step(context.Background())
		rep.Report(context.Background(), o)
		node, err := client.CoreV1().Nodes().Get(context.Background(), "sim", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var cond *corev1.NodeCondition
		for i, c := range node.Status.Conditions {
			if c.Type == nodegate.GuardCondition {
				cond = &node.Status.Conditions[i]
			}
		}
		if cond == nil || cond.Status != want || cond.Reason != reason {
			t.Fatalf("condition %+v; want %s %s (outcome %+v)", cond, want, reason, o)
		}
		if strings.Contains(cond.Message, fakegce.KubeEnvMarker) {
			t.Fatal("the condition carries a concealed value")
		}
		if got := testutil.ToFloat64(rep.Effective.WithLabelValues("team/" + p.name)); got != gauge {
			t.Errorf("metaconceal_guard_effective = %v, want %v", got, gauge)
		}
		evs, err := client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) != events {
			t.Errorf("%d node Events, want %d", len(evs.Items), events)
		}
		t.Logf("round: %s %s: %s", cond.Status, cond.Reason, cond.Message)
	}
	round(corev1.ConditionTrue, "Effective", 1, 0)
	if err := check.Probe(context.Background()); err != nil {
		t.Errorf("gate check with the guard effective: %v", err)
	}
	w.makeGuardInert()
	round(corev1.ConditionFalse, "Bypassed", 0, 1)
	if err := check.Probe(context.Background()); err == nil {
		t.Error("gate check with the guard bypassed, gate never opened: passes; want it holding the gate")
	}
	round(corev1.ConditionFalse, "Bypassed", 0, 1) // still False: no second Event
}
