package hostguard

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// backendCase is one iptables backend the privileged tests run on.
type backendCase struct {
	name    string
	backend xtables.Backend
	save    string
}

var backends = []backendCase{
	{"default", xtables.BackendAuto, "iptables-save"},
	{"legacy", xtables.BackendLegacy, "iptables-legacy-save"},
}

// inEachBackend runs fn as a parallel subtest per backend, each in a simulated node of
// its own, once both backends' iptables are there; the host netns must be untouched
// at the end.
func inEachBackend(t *testing.T, fn func(t *testing.T, ctx context.Context, b backendCase, node *simnode.Node)) {
	t.Helper()
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save", "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			fn(t, context.Background(), b, newNode(t))
		})
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, nil))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newNode(t *testing.T) *simnode.Node {
	t.Helper()
	node, err := simnode.New("mc-hg")
	if err != nil {
		t.Fatalf("creating simulated node: %v", err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	return node
}

// inNetns runs fn on a thread switched into the netns at path; iptables and ip
// commands that fn starts inherit that netns.
func inNetns(t *testing.T, path string, fn func() error) error {
	t.Helper()
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

// guardLines returns the iptables-save lines of the netns that mention the guard.
func guardLines(t *testing.T, node *simnode.Node, save string) []string {
	t.Helper()
	out, err := node.Exec(context.Background(), save)
	if err != nil {
		t.Fatalf("%s in the node netns: %v", save, err)
	}
	var lines []string
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, Chain) || strings.Contains(l, ruleComment) {
			lines = append(lines, l)
		}
	}
	slices.Sort(lines)
	return lines
}

// assertHostUntouched checks that the machine's own netns carries nothing of ours.
func assertHostUntouched(t *testing.T) {
	t.Helper()
	for _, save := range []string{"iptables-save", "iptables-legacy-save"} {
		out, err := exec.Command(save).CombinedOutput()
		if err != nil {
			t.Fatalf("%s (host, read only): %v: %s", save, err, out)
		}
		if strings.Contains(string(out), Chain) {
			t.Errorf("the machine's own netns has %s rules (%s)", Chain, save)
		}
	}
	out, err := exec.Command("ip", "-4", "addr", "show", "dev", "lo").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr (host, read only): %v: %s", err, out)
	}
	if strings.Contains(string(out), AddrLabel) {
		t.Errorf("the machine's own lo carries an address labelled %s", AddrLabel)
	}
}

func TestInstallIdempotentAndRemove(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			node := newNode(t)
			ctx := context.Background()
			// 169.254.169.252 is on the node's lo already (simnode); .251 is not.
			cfg := Config{
				ListenAddrs:     []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988"), netip.MustParseAddrPort("169.254.169.251:988")},
				ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
				Backend:         b.backend,
			}
			log := testLogger(t)
			for i := range 2 {
				if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, log) }); err != nil {
					t.Fatalf("Install #%d: %v", i+1, err)
				}
			}
			want := []string{
				`-A FORWARD -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD`,
				`-A INPUT ! -i lo -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p udp -m udp --dport 53 -m comment --comment "metaconceal host guard" -j RETURN`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 53 -m comment --comment "metaconceal host guard" -j RETURN`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p udp -m udp --dport 123 -m comment --comment "metaconceal host guard" -j RETURN`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m comment --comment "metaconceal host guard" -j REJECT --reject-with tcp-reset`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -m comment --comment "metaconceal host guard" -j REJECT --reject-with icmp-port-unreachable`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment "metaconceal host guard" -j DNAT --to-destination 169.254.169.252:988`,
				`-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 8080 -m comment --comment "metaconceal host guard" -j DNAT --to-destination 169.254.169.252:987`,
				`-A PREROUTING -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD`,
				`-A FORWARD -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD-FROM`,
				`-A OUTPUT ! -o lo -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD-FROM`,
				`-A METACONCEAL-GUARD-FROM -s 169.254.169.254/32 -p tcp -m multiport --sports 80,8080 -m conntrack --ctdir ORIGINAL -m comment --comment "metaconceal host guard" -j REJECT --reject-with tcp-reset`,
				`-A METACONCEAL-GUARD-FROM -s 169.254.169.254/32 -p tcp -m multiport --sports 80,8080 -m conntrack --ctstate INVALID -m comment --comment "metaconceal host guard" -j REJECT --reject-with tcp-reset`,
				`:METACONCEAL-GUARD - [0:0]`,
				`:METACONCEAL-GUARD - [0:0]`,
				`:METACONCEAL-GUARD-FROM - [0:0]`,
			}
			slices.Sort(want)
			if got := guardLines(t, node, b.save); !slices.Equal(got, want) {
				t.Errorf("after two installs, %s shows\n%s\nwant\n%s", b.save, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			addrs, err := node.Exec(ctx, "ip", "-4", "addr", "show", "dev", "lo")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(addrs, "169.254.169.251/32") || !strings.Contains(addrs, AddrLabel) {
				t.Errorf("missing listen address not added with label %s:\n%s", AddrLabel, addrs)
			}
			// Scope host, as GKE: never a source address for the node's own traffic.
			if !strings.Contains(addrs, "inet 169.254.169.251/32 scope host "+AddrLabel) {
				t.Errorf("listen address not added with scope host:\n%s", addrs)
			}
			if n := strings.Count(addrs, AddrLabel); n != 1 {
				t.Errorf("%d addresses labelled %s, want 1 (only the one that was missing):\n%s", n, AddrLabel, addrs)
			}

			for i := range 2 {
				if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, log) }); err != nil {
					t.Fatalf("Remove #%d: %v", i+1, err)
				}
			}
			if got := guardLines(t, node, b.save); len(got) != 0 {
				t.Errorf("after Remove, %s still shows:\n%s", b.save, strings.Join(got, "\n"))
			}
			addrs, err = node.Exec(ctx, "ip", "-4", "addr", "show", "dev", "lo")
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(addrs, "169.254.169.251") {
				t.Errorf("address added by Install still there after Remove:\n%s", addrs)
			}
			for _, keep := range []string{"169.254.169.252/32", "169.254.169.254/32"} {
				if !strings.Contains(addrs, keep) {
					t.Errorf("pre-existing address %s removed:\n%s", keep, addrs)
				}
			}
		})
	}
}

// TestInstallKeepsForeignRules checks that Install and Remove leave the node's other
// rules in the built-in chains alone (--noflush) and that the guard's jumps come
// first.
func TestInstallKeepsForeignRules(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	node := newNode(t)
	ctx := context.Background()
	if _, err := node.Exec(ctx, "iptables", "-A", "FORWARD", "-s", "10.1.2.3/32", "-j", "ACCEPT"); err != nil {
		t.Fatal(err)
	}
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}
	if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, nil) }); err != nil {
		t.Fatal(err)
	}
	out, err := node.Exec(ctx, "iptables", "-S", "FORWARD")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasSuffix(lines[1], "-j "+Chain) || !strings.HasSuffix(lines[2], "-j "+ChainFrom) || !strings.Contains(lines[3], "10.1.2.3") {
		t.Errorf("FORWARD after Install, want the guard's two jumps first then the foreign rule:\n%s", out)
	}
	if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, nil) }); err != nil {
		t.Fatal(err)
	}
	out, err = node.Exec(ctx, "iptables", "-S", "FORWARD")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, Chain) || !strings.Contains(out, "10.1.2.3") {
		t.Errorf("FORWARD after Remove, want only the foreign rule:\n%s", out)
	}
}

// TestInstallConverges checks that Install repairs a damaged guard: a duplicate jump,
// a rule someone put above the guard's jump, and a jump of an older spelling end as
// exactly one jump per chain, first in line.
func TestInstallConverges(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	node := newNode(t)
	ctx := context.Background()
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}
	if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, nil) }); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", ruleComment, "-j", Chain}, // duplicate
		{"-I", "FORWARD", "1", "-s", "10.9.9.9/32", "-j", "ACCEPT"},                               // above ours
		{"-A", "INPUT", "-j", Chain}, // older spelling
	} {
		if _, err := node.Exec(ctx, "iptables", args...); err != nil {
			t.Fatal(err)
		}
	}
	if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, nil) }); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ table, chain string }{{"nat", "PREROUTING"}, {"filter", "FORWARD"}, {"filter", "INPUT"}} {
		out, err := node.Exec(ctx, "iptables", "-t", c.table, "-S", c.chain)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		n := 0
		for _, l := range lines {
			if strings.HasSuffix(l, "-j "+Chain) {
				n++
			}
		}
		if n != 1 || !strings.HasSuffix(lines[1], "-j "+Chain) {
			t.Errorf("%s %s after repair: %d jumps, want exactly one, first:\n%s", c.table, c.chain, n, out)
		}
	}
	if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, nil) }); err != nil {
		t.Fatal(err)
	}
	if got := guardLines(t, node, "iptables-save"); len(got) != 0 {
		t.Errorf("after Remove:\n%s", strings.Join(got, "\n"))
	}
}

// serveName accepts connections on ln and writes name to each.
func serveName(ln net.Listener, name string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte(name))
		_ = c.Close()
	}
}

// dialFrom connects from inside the netns at path and returns what the listener
// answered.
func dialFrom(t *testing.T, path, addr string) (string, error) {
	t.Helper()
	var conn net.Conn
	err := inNetns(t, path, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 3*time.Second)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(conn)
	return string(b), err
}

func TestGuardRedirectsPodTraffic(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			// A pod joined to the node by a veth pair, with no rules of its own (as
			// after it flushed them with CAP_NET_ADMIN). Private test addresses only.
			_, podPath, err := node.AddRoutedPod("mc-hg-pod", "mcg0", "10.250.0.1/24", "10.250.0.2/24")
			if err != nil {
				t.Fatal(err)
			}
			listeners := map[string]string{
				"169.254.169.254:80":   "metadata",
				"169.254.169.254:8080": "metadata-8080",
				"169.254.169.252:988":  "proxy",
			}
			err = inNetns(t, node.Path, func() error {
				for addr, name := range listeners {
					ln, err := net.Listen("tcp", addr)
					if err != nil {
						return err
					}
					t.Cleanup(func() { _ = ln.Close() })
					go serveName(ln, name)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("listening in the node netns: %v", err)
			}
			expect := func(stage, fromPath, from, addr, want string) {
				t.Helper()
				got, err := dialFrom(t, fromPath, addr)
				switch {
				case want == "refused":
					if !errors.Is(err, syscall.ECONNREFUSED) {
						t.Errorf("%s: %s -> %s: got %q, %v; want connection refused", stage, from, addr, got, err)
					}
				case err != nil || got != want:
					t.Errorf("%s: %s -> %s: got %q, %v; want %q", stage, from, addr, got, err, want)
				}
			}

			// Without the guard the pod reaches the metadata listeners: the checks
			// below can fail.
			expect("before Install", podPath, "pod", "169.254.169.254:80", "metadata")
			expect("before Install", podPath, "pod", "169.254.169.254:8080", "metadata-8080")

			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Backend: b.backend}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatalf("Install: %v", err)
			}
			expect("guarded", podPath, "pod", "169.254.169.254:80", "proxy")
			expect("guarded", podPath, "pod", "169.254.169.254:8080", "refused")
			expect("guarded", podPath, "pod", "169.254.169.252:988", "proxy")
			expect("guarded", node.Path, "node", "169.254.169.254:80", "metadata")
			expect("guarded", node.Path, "node", "169.254.169.254:8080", "metadata-8080")

			if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			expect("after Remove", podPath, "pod", "169.254.169.254:80", "metadata")
		})
	}
}
