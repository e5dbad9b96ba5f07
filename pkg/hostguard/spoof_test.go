package hostguard

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/state"
)

func rec(key, hostIf string, exposed bool, ips ...string) state.Record {
	return state.Record{ContainerID: key, IfName: "eth0", HostIf: hostIf, Exposed: exposed, IPs: ips}
}

func TestAttestRules(t *testing.T) {
	t.Parallel()
	// A fake node: veth1 and veth2 are bridge ports, cali3 a routed veth, veth9 gone.
	resolve := func(_ bool, names []string) ([]ingress, []string) {
		var out []ingress
		var probs []string
		for _, n := range names {
			switch n {
			case "veth1", "veth2":
				out = append(out, ingress{name: n, bridgePort: true})
			case "cali3":
				out = append(out, ingress{name: n})
			default:
				probs = append(probs, n+" is gone")
			}
		}
		return out, probs
	}
	recs := []state.Record{
		rec("e", "veth2", true, "10.0.0.5"),
		rec("a", "veth1", false, "10.0.0.2/24", "fd00::2"),
		rec("b", "cali3", false, "10.0.0.3"),
		rec("c", "veth9", true, "10.0.0.4"),
		rec("d", "", true, "10.0.0.10"),
		rec("f", "veth1", false, "10.0.0.5"), // a stale claim of e's IP: concealed first
	}
	c := `-m comment --comment "metaconceal attest"`
	for _, tc := range []struct {
		v6    bool
		rules []string
	}{
		{false, []string{
			"-A METACONCEAL-ATTEST -s 10.0.0.2/32 -m physdev --physdev-in veth1 " + c + " -j METACONCEAL-ATTEST-POD",
			"-A METACONCEAL-ATTEST -s 10.0.0.3/32 -i cali3 " + c + " -j METACONCEAL-ATTEST-POD",
			"-A METACONCEAL-ATTEST -s 10.0.0.5/32 -m physdev --physdev-in veth1 " + c + " -j METACONCEAL-ATTEST-POD",
			"-A METACONCEAL-ATTEST -s 10.0.0.5/32 -m physdev --physdev-in veth2 " + c + " -j METACONCEAL-ATTEST-EXPOSED",
		}},
		{true, []string{
			"-A METACONCEAL-ATTEST -s fd00::2/128 -m physdev --physdev-in veth1 " + c + " -j METACONCEAL-ATTEST-POD",
		}},
	} {
		rules, n, problems := attestRules(tc.v6, recs, resolve)
		if !slices.Equal(rules, tc.rules) || n != len(tc.rules) {
			t.Errorf("v6=%v rules (%d):\n%s\nwant\n%s", tc.v6, n, strings.Join(rules, "\n"), strings.Join(tc.rules, "\n"))
		}
		if !tc.v6 && (len(problems["c:eth0"]) == 0 || len(problems["d:eth0"]) == 0 || len(problems) != 2) {
			t.Errorf("problems %v: want the gone interface of c and the missing one of d", problems)
		}
	}
}

func TestAttestChains(t *testing.T) {
	t.Parallel()
	g, err := NewSpoofGuard(Config{
		ListenAddrs:     []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
		ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	f := g.fams[0]
	c := `-m comment --comment "metaconceal attest"`
	want := map[string][]string{
		AttestPodChain: {
			"-A METACONCEAL-ATTEST-POD -d 169.254.169.254/32 -p tcp -m tcp --dport 80 " + c + " -j DNAT --to-destination 169.254.169.252:984",
			"-A METACONCEAL-ATTEST-POD -d 169.254.169.252/32 -p tcp -m tcp --dport 988 " + c + " -j DNAT --to-destination 169.254.169.252:984",
			"-A METACONCEAL-ATTEST-POD -d 169.254.169.254/32 -p tcp -m tcp --dport 8080 " + c + " -j DNAT --to-destination 169.254.169.252:986",
			"-A METACONCEAL-ATTEST-POD -d 169.254.169.252/32 -p tcp -m tcp --dport 987 " + c + " -j DNAT --to-destination 169.254.169.252:986",
		},
		AttestExposedChain: {
			"-A METACONCEAL-ATTEST-EXPOSED -d 169.254.169.254/32 -p tcp -m tcp --dport 80 " + c + " -j DNAT --to-destination 169.254.169.252:985",
			"-A METACONCEAL-ATTEST-EXPOSED -d 169.254.169.252/32 -p tcp -m tcp --dport 988 " + c + " -j DNAT --to-destination 169.254.169.252:985",
			"-A METACONCEAL-ATTEST-EXPOSED -d 169.254.169.254/32 -p tcp -m tcp --dport 8080 " + c + " -j DNAT --to-destination 169.254.169.252:986",
			"-A METACONCEAL-ATTEST-EXPOSED -d 169.254.169.252/32 -p tcp -m tcp --dport 987 " + c + " -j DNAT --to-destination 169.254.169.252:986",
		},
		SpoofChain: {
			`-A METACONCEAL-SPOOF -d 169.254.169.252/32 -p tcp -m multiport --dports 984,985,986 -m conntrack ! --ctstate DNAT -m comment --comment "metaconceal anti-spoof" -j DROP`,
		},
	}
	for _, ch := range f.chains(nil, true) {
		if w, ok := want[ch.name]; ok && !slices.Equal(ch.rules, w) {
			t.Errorf("%s:\n%s\nwant\n%s", ch.name, strings.Join(ch.rules, "\n"), strings.Join(w, "\n"))
		}
	}
	ls, err := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
		ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}}.AttestedListeners()
	if err != nil || len(ls) != 3 || ls[0].Addr.String() != "169.254.169.252:984" || ls[1].Ingress != podindex.Exposed || !ls[2].Relay {
		t.Errorf("AttestedListeners = %+v, %v", ls, err)
	}
	if _, err := NewSpoofGuard(Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:984")}}, nil); err == nil {
		t.Error("a listen port equal to an attested port was accepted")
	}
}

func TestValidIfName(t *testing.T) {
	t.Parallel()
	for name, ok := range map[string]bool{
		"veth1234abcd": true, "cali0123456789a": true, "eth0": true,
		"": false, "0123456789abcdef": false, "a b": false, "a/b": false, "a:b": false, "..": false, "-j": false, "!x": false, "é": false,
	} {
		if validIfName(name) != ok {
			t.Errorf("validIfName(%q) = %v, want %v", name, !ok, ok)
		}
	}
}
