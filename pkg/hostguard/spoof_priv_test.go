package hostguard

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// TestAttestInNode attests a bridged pod, a routed one and one whose interface is
// gone, in a simulated node, then leaves bridge ports out when bridged packets bypass
// iptables, withdraws every record, and removes the chains.
func TestAttestInNode(t *testing.T) {
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
	recs := []state.Record{
		{ContainerID: "b", IfName: "eth0", IPs: []string{"10.0.0.2"}, HostIf: "mcsvb1", Exposed: true},
		{ContainerID: "r", IfName: "eth0", IPs: []string{"10.0.0.3"}, HostIf: "mcsvr1"},
		{ContainerID: "g", IfName: "eth0", IPs: []string{"10.0.0.4"}, HostIf: "mcsgone"},
	}
	lines := func(table string) []string {
		out, err := node.Exec(ctx, "iptables-save", "-t", table)
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for l := range strings.SplitSeq(out, "\n") {
			if strings.Contains(l, "METACONCEAL-ATTEST") || strings.Contains(l, SpoofChain) {
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
		if err := g.Attest(ctx, recs); err != nil {
			t.Fatalf("Attest #%d: %v", i+1, err)
		}
	}
	nat, filter := lines("nat"), lines("filter")
	for _, c := range []struct {
		lines []string
		sub   string
		n     int
	}{
		{nat, "-A PREROUTING -p tcp", 1},
		{nat, "-s 10.0.0.2/32 -m physdev --physdev-in mcsvb1", 1},
		{nat, "-j METACONCEAL-ATTEST-EXPOSED", 1},
		{nat, "-s 10.0.0.3/32 -i mcsvr1", 1},
		{nat, "-s 10.0.0.4/32", 0},
		{nat, "--to-destination 169.254.169.252:984", 2},
		{filter, "-A INPUT -d 169.254.169.252/32", 1},
		{filter, "! --ctstate DNAT", 1},
	} {
		if got := contains(c.lines, c.sub); got != c.n {
			t.Errorf("%d lines with %q, want %d:\n%s", got, c.sub, c.n, strings.Join(c.lines, "\n"))
		}
	}

	// Bridged packets that bypass iptables cannot be matched by port: not attested.
	if _, err := node.Exec(ctx, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"); err != nil {
		t.Fatal(err)
	}
	if err := newGuard().Attest(ctx, recs); err != nil {
		t.Fatal(err)
	}
	if nat := lines("nat"); contains(nat, "10.0.0.2") != 0 || contains(nat, "10.0.0.3") != 1 {
		t.Errorf("with bridge-nf-call-iptables=0:\n%s\nwant only the routed pod attested", strings.Join(nat, "\n"))
	}

	// Records withdrawn: no rule left for any IP, the jumps stay.
	if err := g.Attest(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if nat := lines("nat"); contains(nat, "-s ") != 0 || contains(nat, "-A PREROUTING") != 1 {
		t.Errorf("after withdrawing every record:\n%s", strings.Join(nat, "\n"))
	}

	if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, testLogger(t)) }); err != nil {
		t.Fatal(err)
	}
	if l := append(lines("nat"), lines("filter")...); len(l) != 0 {
		t.Errorf("after Remove:\n%s", strings.Join(l, "\n"))
	}
}

// BenchmarkAttest measures one attestation update (records changed: iptables-save of
// PREROUTING and INPUT plus one iptables-restore) with 110 attachments, what a new
// pod's first attested connection waits for after its record appears (beside the
// refresher's poll).
func BenchmarkAttest(b *testing.B) {
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
	var recs []state.Record
	for i := range 110 {
		recs = append(recs, state.Record{ContainerID: fmt.Sprint(i), IfName: "eth0", HostIf: "mcsvr1", IPs: []string{fmt.Sprintf("10.0.1.%d", i)}})
	}
	n := 0
	for b.Loop() {
		// A different set each time, so that every call rewrites the chain.
		n++
		recs[0].IPs = []string{fmt.Sprintf("10.0.2.%d", n%250)}
		if err := g.Attest(context.Background(), recs); err != nil {
			b.Fatal(err)
		}
	}
}
