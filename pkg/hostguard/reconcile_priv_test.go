package hostguard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/state"
)

const (
	kubeEnvPath   = "/computeMetadata/v1/instance/attributes/kube-env"
	kubeEnvSecret = "KUBELET_CERT: secret"
	concealedBody = "This metadata endpoint is concealed."
)

// reconcileNode is a simulated node with a routed pod that has no rules of its own (as
// after it flushed them, or as a pod whose hand-made packets its own rules never see:
// the node receives the same packets), a metadata server on 169.254.169.254:80 that
// serves kube-env, and a stand-in for the proxy on 169.254.169.252:988 that conceals
// it. It returns the node and the pod's netns path.
func reconcileNode(t *testing.T, podIf, podNet string) (*simnode.Node, string) {
	t.Helper()
	node := newNode(t)
	_, podPath, err := node.AddRoutedPod("mc-hg-rec", podIf, podNet+".1/24", podNet+".2/24")
	if err != nil {
		t.Fatal(err)
	}
	for addr, h := range map[string]http.HandlerFunc{
		"169.254.169.254:80": func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, kubeEnvSecret) },
		"169.254.169.252:988": func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, concealedBody, http.StatusForbidden)
		},
		// The attested listener: the pod's record sends its connections there.
		"169.254.169.252:984": func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, concealedBody, http.StatusForbidden)
		},
	} {
		ln, err := node.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		t.Cleanup(func() { srv.Close() })
		go func() { _ = srv.Serve(ln) }()
	}
	return node, podPath
}

// getKubeEnv asks for kube-env from the pod netns and returns the answer.
func getKubeEnv(podPath string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, "http://169.254.169.254"+kubeEnvPath, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := simnode.HTTPClientIn(podPath, 3*time.Second).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

func wantConcealed(t *testing.T, stage, podPath string) {
	t.Helper()
	code, body, err := getKubeEnv(podPath)
	if err != nil || code != http.StatusForbidden || body != concealedBody {
		t.Errorf("%s: the pod's request for kube-env got %d %q, %v; want the concealed answer", stage, code, body, err)
	}
}

// metaconcealLines returns, in iptables-save order, every line of the node's rules
// that belongs to the guard or its anti-spoofing chain.
func metaconcealLines(t *testing.T, node *simnode.Node, save string) []string {
	t.Helper()
	out, err := node.Exec(context.Background(), save)
	if err != nil {
		t.Fatalf("%s: %v", save, err)
	}
	var lines []string
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, "METACONCEAL") || strings.Contains(l, "metaconceal") {
			lines = append(lines, l)
		}
	}
	return lines
}

// deleteGuardJumps deletes, by hand, every rule of a built-in chain that jumps into a
// chain of the guard or of its anti-spoofing.
func deleteGuardJumps(t *testing.T, node *simnode.Node, iptables string) {
	t.Helper()
	out, err := node.Exec(context.Background(), iptables+"-save")
	if err != nil {
		t.Fatal(err)
	}
	table, n := "", 0
	for l := range strings.SplitSeq(out, "\n") {
		if name, ok := strings.CutPrefix(l, "*"); ok {
			table = name
		}
		rest, ok := strings.CutPrefix(l, "-A ")
		if !ok || strings.HasPrefix(rest, "METACONCEAL") || !strings.Contains(rest, "-j METACONCEAL") {
			continue
		}
		// iptables-save quotes the way a shell reads it.
		if _, err := node.Exec(context.Background(), "sh", "-c", iptables+" -t "+table+" -D "+rest); err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n == 0 {
		t.Fatal("no jump into the guard to delete")
	}
}

// flushGuardChains flushes, by hand, every chain of the guard and of its anti-spoofing.
func flushGuardChains(t *testing.T, node *simnode.Node, iptables string) {
	t.Helper()
	for _, c := range []struct{ table, chain string }{
		{"raw", ChainSource}, {"nat", Chain}, {"filter", Chain}, {"filter", ChainFrom}, {"filter", ChainLimit}, {"filter", SpoofChain},
		{"nat", AttestChain}, {"nat", AttestPodChain}, {"nat", AttestExposedChain},
	} {
		if _, err := node.Exec(context.Background(), iptables, "-t", c.table, "-F", c.chain); err != nil {
			t.Fatal(err)
		}
	}
}

// counterSum sums a counter of the registry over the label values given.
func counterSum(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metrics
				}
			}
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// TestReconcileRestoresGuard: in a simulated node with the guard installed (limit on,
// a pod's attestation rules in place), a few passes over the whole guard
// write nothing; then the guard's jumps deleted by hand, separately its chains flushed
// by hand, and the proxy's listen address deleted from lo each open the way to the
// metadata server (controls, before the loop runs) and are back within the default
// interval of the running loop, after which the pod's request for kube-env gets the
// concealed answer again. Repairs are counted per table.
func TestReconcileRestoresGuard(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "sh", "iptables", "iptables-restore", "iptables-save", "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	for i, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			podNet := fmt.Sprintf("10.253.%d", i)
			node, podPath := reconcileNode(t, fmt.Sprintf("mcr%d", i), podNet)
			iptables := strings.TrimSuffix(b.save, "-save")
			reg := prometheus.NewRegistry()
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
				ConnRate:        DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: b.backend}
			g, err := New(cfg, Options{Log: testLogger(t), Registerer: reg, NetnsPath: node.Path})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Install(ctx); err != nil {
				t.Fatalf("Install: %v", err)
			}
			pod := netip.MustParseAddr(podNet + ".2")
			if err := g.Spoof().Attest(ctx, []state.Record{{ContainerID: "c", IfName: "eth0", IPs: []string{pod.String()}, HostIf: fmt.Sprintf("mcr%d", i)}}); err != nil {
				t.Fatalf("Attest: %v", err)
			}
			wantConcealed(t, "installed", podPath)
			whole := metaconcealLines(t, node, b.save)
			if !slices.ContainsFunc(whole, func(l string) bool { return strings.HasPrefix(l, "-A "+AttestChain+" -s "+pod.String()) }) {
				t.Fatalf("no attestation rule for the exposed pod:\n%s", strings.Join(whole, "\n"))
			}

			// A whole guard: one iptables-save per pass, no write.
			run := g.fams[0].run
			before := run.Counts()
			for range 3 {
				rep, err := g.Reconcile(ctx)
				if err != nil || rep.Restores != 0 || len(rep.Missing) != 0 {
					t.Fatalf("pass over a whole guard: %+v, %v", rep, err)
				}
			}
			after := run.Counts()
			restore, save := iptables+"-restore", iptables+"-save"
			if after[restore] != before[restore] || after[save] != before[save]+3 || run.Total() != after[save]+after[restore] {
				t.Errorf("three passes over a whole guard ran %v (before: %v); want three %s and nothing else", after, before, save)
			}

			loAddr := func() bool {
				out, err := node.Exec(ctx, "ip", "-4", "addr", "show", "dev", "lo")
				return err == nil && strings.Contains(out, "169.254.169.252/32")
			}
			for _, d := range []struct {
				name    string
				damage  func()
				control func() error // nil: the damage is real
			}{
				{"jumps deleted", func() { deleteGuardJumps(t, node, iptables) }, func() error {
					if code, body, err := getKubeEnv(podPath); err != nil || body != kubeEnvSecret {
						return fmt.Errorf("got %d %q, %v; want kube-env itself", code, body, err)
					}
					return nil
				}},
				{"chains flushed", func() { flushGuardChains(t, node, iptables) }, func() error {
					if code, body, err := getKubeEnv(podPath); err != nil || body != kubeEnvSecret {
						return fmt.Errorf("got %d %q, %v; want kube-env itself", code, body, err)
					}
					return nil
				}},
				{"listen address deleted", func() {
					if _, err := node.Exec(ctx, "ip", "addr", "del", "169.254.169.252/32", "dev", "lo"); err != nil {
						t.Fatal(err)
					}
				}, func() error {
					if code, body, err := getKubeEnv(podPath); err == nil {
						return fmt.Errorf("got %d %q; want no answer (the redirect leads nowhere)", code, body)
					}
					return nil
				}},
			} {
				d.damage()
				if err := d.control(); err != nil {
					t.Fatalf("%s, before reconciliation (control): %v", d.name, err)
				}
				start := time.Now()
				stop := g.Start(ctx)
				deadline := start.Add(30 * time.Second) // generous: the bound is one 5 s interval
				for !(slices.Equal(metaconcealLines(t, node, b.save), whole) && loAddr()) {
					if time.Now().After(deadline) {
						stop()
						t.Fatalf("%s: not restored within %s:\n%s", d.name, time.Since(start), strings.Join(metaconcealLines(t, node, b.save), "\n"))
					}
					time.Sleep(100 * time.Millisecond)
				}
				stop()
				t.Logf("%s: restored after %s (interval %s)", d.name, time.Since(start).Round(10*time.Millisecond), DefaultReconcileInterval)
				wantConcealed(t, d.name+", after reconciliation", podPath)
			}
			for _, table := range []string{"raw", "nat", "filter", "lo"} {
				if n := counterSum(t, reg, "metaconceal_guard_repairs_total", map[string]string{"family": "ipv4", "table": table}); n < 1 {
					t.Errorf("metaconceal_guard_repairs_total{family=ipv4,table=%s} = %v, want at least 1", table, n)
				}
			}
			if n := counterSum(t, reg, "metaconceal_guard_reconcile_failures_total", nil); n != 0 {
				t.Errorf("%v failed passes", n)
			}
			if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatal(err)
			}
			if lines := metaconcealLines(t, node, b.save); len(lines) != 0 {
				t.Errorf("after Remove:\n%s", strings.Join(lines, "\n"))
			}
		})
	}
}

// TestReconcileKeepsForeignRules: rules of others in the chains the guard hooks, before
// and after its jumps, are neither removed nor reordered by a pass over a whole guard,
// by the repair of flushed guard chains (which leaves every built-in chain exactly as it
// was) or by the repair of deleted jumps (which puts the guard's jumps back on top).
func TestReconcileKeepsForeignRules(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save", "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			iptables := strings.TrimSuffix(b.save, "-save")
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ConnRate: DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: b.backend}
			g, err := New(cfg, Options{Log: testLogger(t), NetnsPath: node.Path})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Install(ctx); err != nil {
				t.Fatal(err)
			}
			for _, args := range [][]string{
				{"-t", "nat", "-I", "PREROUTING", "1", "-s", "10.9.9.1/32", "-j", "ACCEPT"},
				{"-t", "nat", "-A", "PREROUTING", "-s", "10.9.9.2/32", "-j", "ACCEPT"},
				{"-I", "INPUT", "1", "-s", "10.9.9.3/32", "-j", "ACCEPT"},
				{"-I", "INPUT", "3", "-s", "10.9.9.4/32", "-j", "ACCEPT"}, // between the guard's jumps
				{"-A", "INPUT", "-s", "10.9.9.5/32", "-j", "ACCEPT"},
			} {
				if _, err := node.Exec(ctx, iptables, args...); err != nil {
					t.Fatal(err)
				}
			}
			builtinRules := func() map[string][]string {
				out := map[string][]string{}
				for _, c := range []struct{ table, chain string }{{"nat", "PREROUTING"}, {"filter", "INPUT"}, {"filter", "FORWARD"}, {"raw", "PREROUTING"}} {
					s, err := node.Exec(ctx, iptables, "-t", c.table, "-S", c.chain)
					if err != nil {
						t.Fatal(err)
					}
					out[c.table+" "+c.chain] = strings.Split(strings.TrimSpace(s), "\n")
				}
				return out
			}
			foreign := func(m map[string][]string) map[string][]string {
				out := map[string][]string{}
				for k, lines := range m {
					for _, l := range lines {
						if !strings.Contains(l, "METACONCEAL") {
							out[k] = append(out[k], l)
						}
					}
				}
				return out
			}
			equal := func(a, b map[string][]string) bool {
				return len(a) == len(b) && func() bool {
					for k := range a {
						if !slices.Equal(a[k], b[k]) {
							return false
						}
					}
					return true
				}()
			}
			first := builtinRules()
			if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 0 {
				t.Fatalf("pass over a whole guard among foreign rules: %+v, %v", rep, err)
			}
			if got := builtinRules(); !equal(got, first) {
				t.Errorf("a pass over a whole guard changed the built-in chains:\n%q\nwant\n%q", got, first)
			}

			flushGuardChains(t, node, iptables)
			if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 1 {
				t.Fatalf("repairing flushed chains: %+v, %v", rep, err)
			}
			if got := builtinRules(); !equal(got, first) {
				t.Errorf("repairing flushed guard chains changed the built-in chains:\n%q\nwant\n%q", got, first)
			}

			deleteGuardJumps(t, node, iptables)
			if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 1 {
				t.Fatalf("repairing deleted jumps: %+v, %v", rep, err)
			}
			got := builtinRules()
			if !equal(foreign(got), foreign(first)) {
				t.Errorf("repairing deleted jumps removed or reordered foreign rules:\n%q\nwant\n%q", foreign(got), foreign(first))
			}
			if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 0 {
				t.Errorf("pass after the repair: %+v, %v; want a whole guard", rep, err)
			}
		})
	}
}

// A pass whose restore fails reports the error; the pass after it, with the tools
// back, repairs.
func TestReconcileReportsFailure(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	ctx := context.Background()
	node := newNode(t)
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, ConnRate: DefaultConnRate, ConnBurst: DefaultConnBurst}
	g, err := New(cfg, Options{Log: testLogger(t), NetnsPath: node.Path})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Install(ctx); err != nil {
		t.Fatal(err)
	}
	flushGuardChains(t, node, "iptables")
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := g.Reconcile(canceled); err == nil || !errors.Is(err, context.Canceled) && !strings.Contains(err.Error(), "context canceled") {
		t.Errorf("pass with a canceled context: %v; want the error", err)
	}
	if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 1 {
		t.Errorf("next pass: %+v, %v; want one repair", rep, err)
	}
}

// BenchmarkReconcile measures one reconciliation pass in a simulated node with the whole
// guard (limit on, the ALTS relay's address, an exposed pod's anti-spoofing rules):
// over a whole guard (one iptables-save), and repairing it after its chains were
// flushed by hand (one iptables-save and one iptables-restore; the flush is not timed).
func BenchmarkReconcile(b *testing.B) {
	testutil.RequirePrivileged(b, "ip", "iptables", "iptables-restore", "iptables-save", "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")
	for _, be := range backends {
		for _, repair := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/%s", be.name, map[bool]string{false: "whole", true: "repair"}[repair]), func(b *testing.B) {
				ctx := context.Background()
				node, err := simnode.New("mc-hg")
				if err != nil {
					b.Fatal(err)
				}
				defer node.Close()
				if _, err := simnode.Run(ctx, "ip", "-n", node.Name, "link", "add", "mcbr1", "type", "veth", "peer", "name", "mcbr1p"); err != nil {
					b.Fatal(err)
				}
				cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
					ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
					ConnRate:        DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: be.backend}
				g, err := New(cfg, Options{NetnsPath: node.Path})
				if err != nil {
					b.Fatal(err)
				}
				if err := g.Install(ctx); err != nil {
					b.Fatal(err)
				}
				if err := g.Spoof().Attest(ctx, []state.Record{{ContainerID: "c", IfName: "eth0", IPs: []string{"10.0.0.2"}, HostIf: "mcbr1"}}); err != nil {
					b.Fatal(err)
				}
				iptables := strings.TrimSuffix(be.save, "-save")
				for b.Loop() {
					if repair {
						b.StopTimer()
						if _, err := node.Exec(ctx, iptables, "-t", "nat", "-F", Chain); err != nil {
							b.Fatal(err)
						}
						if _, err := node.Exec(ctx, iptables, "-F", SpoofChain); err != nil {
							b.Fatal(err)
						}
						b.StartTimer()
					}
					rep, err := g.Reconcile(ctx)
					if err != nil || (rep.Restores == 1) != repair {
						b.Fatalf("pass: %+v, %v", rep, err)
					}
				}
			})
		}
	}
}

// TestReconcileDualStack: with IPv6 metadata and listen addresses, what the guard writes
// reads back as written in both families (a pass over the fresh guard writes nothing),
// and a flushed ip6tables chain is put back by the IPv6 pass alone.
func TestReconcileDualStack(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	ctx := context.Background()
	node := newNode(t)
	if _, err := node.Exec(ctx, "ip", "addr", "add", "fd20:ce::252/128", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		ListenAddrs:     []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988"), netip.MustParseAddrPort("[fd20:ce::252]:988")},
		ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987"), netip.MustParseAddrPort("[fd20:ce::252]:987")},
		MetadataAddrs:   []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")},
		ConnRate:        3000, ConnBurst: DefaultConnBurst, // a rate iptables prints back as 3003
	}
	reg := prometheus.NewRegistry()
	g, err := New(cfg, Options{Log: testLogger(t), Registerer: reg, NetnsPath: node.Path})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Install(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Spoof().Attest(ctx, []state.Record{{ContainerID: "c", IfName: "eth0", IPs: []string{"fd00:1::2", "10.0.0.2"}, HostIf: "lo"}}); err != nil {
		t.Fatal(err)
	}
	if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 0 {
		t.Fatalf("pass over a fresh dual-stack guard: %+v, %v; want nothing to repair", rep, err)
	}
	if _, err := node.Exec(ctx, "ip6tables", "-F", Chain); err != nil {
		t.Fatal(err)
	}
	rep, err := g.Reconcile(ctx)
	if err != nil || rep.Restores != 1 || !slices.Equal(rep.Missing, []string{"IPv6 filter chain " + Chain + " rules"}) {
		t.Errorf("after flushing the IPv6 filter chain: %+v, %v", rep, err)
	}
	if n := counterSum(t, reg, "metaconceal_guard_repairs_total", map[string]string{"family": "ipv6", "table": "filter"}); n != 1 {
		t.Errorf("repairs{ipv6,filter} = %v, want 1", n)
	}
	if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 0 {
		t.Errorf("pass after the repair: %+v, %v", rep, err)
	}
}

// TestGuardStaysInItsNetns: a Guard made without NetnsPath on a thread inside a
// simulated node refuses to run a pass, or to Protect, from a thread in another
// namespace (here the machine's own: nothing may be written there), and works from a
// thread in the node.
func TestGuardStaysInItsNetns(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	ctx := context.Background()
	node := newNode(t)
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.251:988")}}
	var g *Guard
	if err := simnode.In(node.Path, func() error {
		var err error
		if g, err = New(cfg, Options{Log: testLogger(t)}); err != nil {
			return err
		}
		return g.Install(ctx)
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Reconcile(ctx); err == nil || !strings.Contains(err.Error(), "another network namespace") {
		t.Errorf("pass from the machine's own namespace: %v; want a refusal", err)
	}
	if err := g.Spoof().Attest(ctx, nil); err == nil || !strings.Contains(err.Error(), "another network namespace") {
		t.Errorf("Attest from the machine's own namespace: %v; want a refusal", err)
	}
	if err := simnode.In(node.Path, func() error {
		_, err := g.Reconcile(ctx)
		return err
	}); err != nil {
		t.Errorf("pass from the node: %v", err)
	}
}
