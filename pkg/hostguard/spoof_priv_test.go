package hostguard

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TestSpoofGuardInNode protects a bridged pod IP, a routed one and one whose interface
// is gone, in a simulated node, then fails closed for bridge ports when bridged packets
// bypass iptables, withdraws every claim, and removes the chain.
func TestSpoofGuardInNode(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save", "sysctl")
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	node := newNode(t)
	ctx := context.Background()
	for _, args := range [][]string{
		{"link", "add", "mcsbr0", "type", "bridge"},
		{"link", "add", "mcsvb1", "type", "veth", "peer", "name", "mcsvb1p"},
		{"link", "set", "mcsvb1", "master", "mcsbr0"},
		{"link", "add", "mcsvr1", "type", "veth", "peer", "name", "mcsvr1p"},
	} {
		if _, err := simnode.Run(ctx, "ip", append([]string{"-n", node.Name}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}
	newGuard := func() *SpoofGuard {
		g, err := NewSpoofGuard(cfg, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		g.NetnsPath = node.Path
		return g
	}
	bridged, routed, gone := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.4")
	claims := Claims{bridged: {"mcsvb1"}, routed: {"mcsvr1"}, gone: {"mcsgone"}}
	spoofLines := func() []string {
		out, err := node.Exec(ctx, "iptables-save", "-t", "filter")
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for l := range strings.SplitSeq(out, "\n") {
			if strings.Contains(l, SpoofChain) {
				lines = append(lines, l)
			}
		}
		return lines
	}
	contains := func(lines []string, sub string) int {
		n := 0
		for _, l := range lines {
			if strings.Contains(l, sub) {
				n++
			}
		}
		return n
	}

	g := newGuard()
	for i := range 2 {
		prot, err := g.Protect(ctx, claims)
		if err != nil {
			t.Fatalf("Protect #%d: %v", i+1, err)
		}
		if !prot[bridged] || !prot[routed] || prot[gone] {
			t.Errorf("Protect #%d protected %v; want the bridged and the routed IP, not the one whose interface is gone", i+1, prot)
		}
	}
	lines := spoofLines()
	for sub, n := range map[string]int{
		"-A INPUT -d 169.254.169.252/32":                1,
		"-s 10.0.0.2/32 -m physdev --physdev-in mcsvb1": 1,
		"-s 10.0.0.3/32 -i mcsvr1":                      1,
		"-s 10.0.0.4/32":                                0,
		"-j DROP":                                       2,
	} {
		if got := contains(lines, sub); got != n {
			t.Errorf("%d lines with %q, want %d:\n%s", got, sub, n, strings.Join(lines, "\n"))
		}
	}

	// Bridged packets that bypass iptables cannot be matched by port: fail closed.
	if _, err := node.Exec(ctx, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"); err != nil {
		t.Fatal(err)
	}
	prot, err := newGuard().Protect(ctx, claims)
	if err != nil {
		t.Fatal(err)
	}
	if prot[bridged] || !prot[routed] {
		t.Errorf("with bridge-nf-call-iptables=0 Protect protected %v; want only the routed IP", prot)
	}

	// Claims withdrawn: no rule left for any IP, the jump stays.
	if _, err := g.Protect(ctx, Claims{}); err != nil {
		t.Fatal(err)
	}
	if lines := spoofLines(); contains(lines, "-s ") != 0 || contains(lines, "-A INPUT") != 1 {
		t.Errorf("after withdrawing every claim:\n%s", strings.Join(lines, "\n"))
	}

	if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, testLogger(t)) }); err != nil {
		t.Fatal(err)
	}
	if lines := spoofLines(); len(lines) != 0 {
		t.Errorf("after Remove:\n%s", strings.Join(lines, "\n"))
	}
}

// BenchmarkProtect measures one anti-spoofing update (claims changed: iptables-save of
// INPUT plus one iptables-restore) with 50 exposed IPs, what a pod's first exposed answer
// waits for after its record appears.
func BenchmarkProtect(b *testing.B) {
	testutil.RequirePrivileged(b, "ip", "iptables", "iptables-restore")
	node, err := simnode.New("mc-hg")
	if err != nil {
		b.Fatal(err)
	}
	defer node.Close()
	if _, err := simnode.Run(context.Background(), "ip", "-n", node.Name, "link", "add", "mcsvr1", "type", "veth", "peer", "name", "mcsvr1p"); err != nil {
		b.Fatal(err)
	}
	g, err := NewSpoofGuard(Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}, nil)
	if err != nil {
		b.Fatal(err)
	}
	g.NetnsPath = node.Path
	claims := Claims{}
	for i := range 50 {
		claims[netip.AddrFrom4([4]byte{10, 0, 1, byte(i)})] = []string{"mcsvr1"}
	}
	n := 0
	for b.Loop() {
		// A different set each time, so that every call rewrites the chain.
		n++
		claims[netip.AddrFrom4([4]byte{10, 0, 2, byte(n)})] = []string{"mcsvr1"}
		if _, err := g.Protect(context.Background(), claims); err != nil {
			b.Fatal(err)
		}
		delete(claims, netip.AddrFrom4([4]byte{10, 0, 2, byte(n)}))
	}
}
