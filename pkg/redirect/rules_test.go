package redirect

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

var att = Attachment{ContainerID: "0123456789abcdef", IfName: "eth0"}

func v4Spec() Spec {
	return Spec{Family: xtables.IPv4, Attachment: att,
		Metadata: []netip.Addr{netip.MustParseAddr("169.254.169.254")},
		Proxy:    netip.MustParseAddrPort("169.254.169.252:988"),
		ALTS:     netip.MustParseAddrPort("169.254.169.252:987")}
}

// v4Pass and v4Reject are the filter rules every xtables.IPv4 spec renders for 169.254.169.254.
const v4Pass = "-d 169.254.169.254/32 -p udp -m udp --dport 53 -j RETURN\n" +
	"-d 169.254.169.254/32 -p tcp -m tcp --dport 53 -j RETURN\n" +
	"-d 169.254.169.254/32 -p udp -m udp --dport 123 -j RETURN\n" +
	"-d 169.254.169.254/32 -j REJECT --reject-with icmp-port-unreachable"

func TestChainName(t *testing.T) {
	t.Parallel()
	name := att.Chain()
	if !regexp.MustCompile(`^METACONCEAL-[0-9a-f]{12}$`).MatchString(name) || len(name) > 28 {
		t.Fatalf("chain name %q: want METACONCEAL- and 12 hex digits, at most 28 characters", name)
	}
	if name != att.Chain() {
		t.Errorf("chain name not stable")
	}
	others := []Attachment{
		{ContainerID: "0123456789abcdef", IfName: "eth1"},
		{ContainerID: "0123456789abcdee", IfName: "eth0"},
		{ContainerID: "a-b", IfName: "c"},
		{ContainerID: "a", IfName: "b-c"},
	}
	seen := map[string]Attachment{name: att}
	for _, o := range others {
		if prev, dup := seen[o.Chain()]; dup {
			t.Errorf("attachments %v and %v share chain %s", prev, o, o.Chain())
		}
		seen[o.Chain()] = o
	}
}

func TestCommentSanitized(t *testing.T) {
	t.Parallel()
	a := Attachment{ContainerID: `evil" -j ACCEPT \`, IfName: "eth0"}
	c := a.comment()
	if strings.ContainsAny(c, `"\'`) {
		t.Errorf("comment %q keeps quoting characters", c)
	}
	long := Attachment{ContainerID: strings.Repeat("a", 400), IfName: "eth0"}
	if n := len(long.comment()); n > 255 {
		t.Errorf("comment is %d bytes, xt_comment holds 255", n)
	}
}

// The rendered rules are what iptables-save prints (checked against both backends by
// the privileged tests; here against the form they printed).
func TestRenderIPv4(t *testing.T) {
	t.Parallel()
	tables, err := Render(v4Spec())
	if err != nil {
		t.Fatal(err)
	}
	chain := att.Chain()
	got := AddRestore(tables, chain)
	want := "*nat\n" +
		"-N " + chain + "\n" +
		`-I OUTPUT 1 -m comment --comment "metaconceal 0123456789abcdef eth0" -j ` + chain + "\n" +
		"-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988\n" +
		"-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 169.254.169.252:987\n" +
		"COMMIT\n" +
		"*filter\n" +
		"-N " + chain + "\n" +
		`-I OUTPUT 1 -m comment --comment "metaconceal 0123456789abcdef eth0" -j ` + chain + "\n" +
		"-A " + chain + " " + strings.ReplaceAll(v4Pass, "\n", "\n-A "+chain+" ") + "\n" +
		"COMMIT\n"
	if got != want {
		t.Errorf("AddRestore:\n%s\nwant:\n%s", got, want)
	}
}

// Each port of the metadata address gets its treatment, whatever the proxy and relay
// settings: DNS and NTP always pass, 80 and 8080 are DNATed when their target is set
// and rejected otherwise.
func TestRenderPortTreatment(t *testing.T) {
	t.Parallel()
	proxy := netip.MustParseAddrPort("169.254.169.252:988")
	alts := netip.MustParseAddrPort("169.254.169.252:987")
	for _, tc := range []struct {
		name        string
		proxy, alts netip.AddrPort
		wantNAT     []string
	}{
		{"relay", proxy, alts, []string{
			"-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988",
			"-d 169.254.169.254/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 169.254.169.252:987"}},
		{"alts reject", proxy, netip.AddrPort{}, []string{
			"-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988"}},
		{"relay only", netip.AddrPort{}, alts, []string{
			"-d 169.254.169.254/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 169.254.169.252:987"}},
		{"nothing redirected", netip.AddrPort{}, netip.AddrPort{}, nil},
	} {
		s := v4Spec()
		s.Proxy, s.ALTS = tc.proxy, tc.alts
		tables, err := Render(s)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		var nat, filter []string
		for _, tr := range tables {
			for _, r := range tr.Chain {
				if tr.Table == xtables.TableNAT {
					nat = append(nat, r.String())
				} else {
					filter = append(filter, r.String())
				}
			}
		}
		if strings.Join(nat, "\n") != strings.Join(tc.wantNAT, "\n") {
			t.Errorf("%s: nat rules\n%s\nwant\n%s", tc.name, strings.Join(nat, "\n"), strings.Join(tc.wantNAT, "\n"))
		}
		if tc.wantNAT == nil && len(tables) != 1 {
			t.Errorf("%s: want no nat table, got %d tables", tc.name, len(tables))
		}
		if got := strings.Join(filter, "\n"); got != v4Pass {
			t.Errorf("%s: filter rules\n%s\nwant\n%s", tc.name, got, v4Pass)
		}
	}
}

func TestRenderIPv6(t *testing.T) {
	t.Parallel()
	s := Spec{Family: xtables.IPv6, Attachment: att, Metadata: []netip.Addr{netip.MustParseAddr("fd20:ce:0::254")}}
	tables, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if len(tables) != 1 || tables[0].Table != xtables.TableFilter {
		t.Fatalf("without proxy6 want only a filter table, got %+v", tables)
	}
	if got, want := tables[0].Chain[0].String(), "-d fd20:ce::254/128 -p udp -m udp --dport 53 -j RETURN"; got != want {
		t.Errorf("first rule %q, want %q", got, want)
	}
	if got, want := tables[0].Chain[3].String(), "-d fd20:ce::254/128 -j REJECT --reject-with icmp6-port-unreachable"; len(tables[0].Chain) != 4 || got != want {
		t.Errorf("reject rule %q of %d, want %q last of 4", got, len(tables[0].Chain), want)
	}
	s.Proxy = netip.MustParseAddrPort("[fd20:ce::252]:988")
	tables, err = Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := tables[0].Chain[0].String(), "-d fd20:ce::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd20:ce::252]:988"; tables[0].Table != xtables.TableNAT || got != want {
		t.Errorf("nat rule %s %q, want nat %q", tables[0].Table, got, want)
	}
}

func TestRenderInvalid(t *testing.T) {
	t.Parallel()
	for name, mutate := range map[string]func(*Spec){
		"family":         func(s *Spec) { s.Family = 5 },
		"no container":   func(s *Spec) { s.Attachment.ContainerID = "" },
		"no ifname":      func(s *Spec) { s.Attachment.IfName = "" },
		"no metadata":    func(s *Spec) { s.Metadata = nil },
		"v6 metadata":    func(s *Spec) { s.Metadata = []netip.Addr{netip.MustParseAddr("fd20:ce::254")} },
		"v6 proxy in v4": func(s *Spec) { s.Proxy = netip.MustParseAddrPort("[fd00::1]:988") },
		"v6 alts in v4":  func(s *Spec) { s.ALTS = netip.MustParseAddrPort("[fd00::1]:987") },
	} {
		s := v4Spec()
		mutate(&s)
		if _, err := Render(s); err == nil {
			t.Errorf("%s: Render accepted %+v", name, s)
		}
	}
}

const sampleSave = `# Generated by iptables-nft-save v1.8.9 (nf_tables) on Wed Nov 25 21:43:43 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:METACONCEAL-aaaaaaaaaaaa - [0:0]
:METACONCEAL-bbbbbbbbbbbb - [0:0]
-A OUTPUT -m comment --comment "metaconceal c2 eth1" -j METACONCEAL-bbbbbbbbbbbb
-A OUTPUT -m comment --comment "metaconceal c1 eth0" -j METACONCEAL-aaaaaaaaaaaa
-A OUTPUT -m comment --comment "stale duplicate" -j METACONCEAL-aaaaaaaaaaaa
-A METACONCEAL-aaaaaaaaaaaa -d 169.254.169.254/32 -j REJECT --reject-with icmp-port-unreachable
-A METACONCEAL-bbbbbbbbbbbb -d 169.254.169.254/32 -j REJECT --reject-with icmp-port-unreachable
COMMIT
# Completed on Wed Nov 25 21:43:43 2026
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:METACONCEAL-aaaaaaaaaaaa - [0:0]
-A OUTPUT -m comment --comment "metaconceal c1 eth0" -j METACONCEAL-aaaaaaaaaaaa
-A METACONCEAL-aaaaaaaaaaaa -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988
COMMIT
# Warning: iptables-legacy tables present, use iptables-legacy-save to see them
`

func TestParseSave(t *testing.T) {
	t.Parallel()
	s, err := xtables.ParseSave(sampleSave)
	if err != nil {
		t.Fatal(err)
	}
	const a, b = "METACONCEAL-aaaaaaaaaaaa", "METACONCEAL-bbbbbbbbbbbb"
	if !s.HasChain("nat", a) || s.HasChain("nat", b) || !s.HasChain("filter", b) || s.HasChain("mangle", a) {
		t.Errorf("HasChain wrong")
	}
	if got := s.Jumps("filter", a); len(got) != 2 || !strings.HasPrefix(got[0], `OUTPUT -m comment --comment "metaconceal c1 eth0"`) {
		t.Errorf("Jumps(filter, a) = %q", got)
	}
	if got := s.ChainRules("nat", a); len(got) != 1 || !strings.HasSuffix(got[0], "--to-destination 169.254.169.252:988") {
		t.Errorf("ChainRules(nat, a) = %q", got)
	}
	if got := s.TablesWith(b); len(got) != 1 || got[0] != "filter" {
		t.Errorf("TablesWith(b) = %q", got)
	}
	if got := s.Chains(ChainPrefix); strings.Join(got, ",") != a+","+b {
		t.Errorf("Chains = %q", got)
	}

	removal := RemovalRestore(a, s)
	for _, line := range []string{
		"*filter", "*nat",
		`-D OUTPUT -m comment --comment "metaconceal c1 eth0" -j ` + a,
		`-D OUTPUT -m comment --comment "stale duplicate" -j ` + a,
		"-F " + a, "-X " + a,
	} {
		if !strings.Contains(removal, line+"\n") {
			t.Errorf("removal lacks %q:\n%s", line, removal)
		}
	}
	if strings.Contains(removal, b) {
		t.Errorf("removal of %s touches %s:\n%s", a, b, removal)
	}
	if got := RemovalRestore("METACONCEAL-cccccccccccc", s); got != "" {
		t.Errorf("removal of an absent chain = %q, want empty", got)
	}
}

// Reconciling removes every duplicate jump, declares (flushes) the chain, and removes
// the attachment's chain from a table it should no longer use.
func TestReconcileRestore(t *testing.T) {
	t.Parallel()
	a := Attachment{ContainerID: "c1", IfName: "eth0"}
	chain := a.Chain()
	save := strings.ReplaceAll(sampleSave, "METACONCEAL-aaaaaaaaaaaa", chain)
	snap, err := xtables.ParseSave(save)
	if err != nil {
		t.Fatal(err)
	}
	s := v4Spec()
	s.Attachment = a
	tables, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	out := ReconcileRestore(tables[1:], chain, snap) // filter only: nat must be removed
	wantLines := []string{
		"*filter", ":" + chain + " - [0:0]",
		`-D OUTPUT -m comment --comment "metaconceal c1 eth0" -j ` + chain,
		`-D OUTPUT -m comment --comment "stale duplicate" -j ` + chain,
		`-I OUTPUT 1 -m comment --comment "metaconceal c1 eth0" -j ` + chain,
		"-A " + chain + " -d 169.254.169.254/32 -p udp -m udp --dport 53 -j RETURN",
		"-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 53 -j RETURN",
		"-A " + chain + " -d 169.254.169.254/32 -p udp -m udp --dport 123 -j RETURN",
		"-A " + chain + " -d 169.254.169.254/32 -j REJECT --reject-with icmp-port-unreachable",
		"COMMIT", "*nat",
		`-D OUTPUT -m comment --comment "metaconceal c1 eth0" -j ` + chain,
		"-F " + chain, "-X " + chain, "COMMIT",
	}
	if got := strings.Split(strings.TrimSuffix(out, "\n"), "\n"); strings.Join(got, "\n") != strings.Join(wantLines, "\n") {
		t.Errorf("ReconcileRestore:\n%s\nwant:\n%s", out, strings.Join(wantLines, "\n"))
	}
}

func TestDeleteRestore(t *testing.T) {
	t.Parallel()
	tables, err := Render(v4Spec())
	if err != nil {
		t.Fatal(err)
	}
	chain := att.Chain()
	out := DeleteRestore(tables, chain)
	for _, table := range []string{"nat", "filter"} {
		block := "*" + table + "\n-D OUTPUT " + tables[0].Jump.String() + "\n-F " + chain + "\n-X " + chain + "\nCOMMIT\n"
		if !strings.Contains(out, block) {
			t.Errorf("DeleteRestore lacks block:\n%s\ngot:\n%s", block, out)
		}
	}
}
