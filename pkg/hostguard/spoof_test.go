package hostguard

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestSpoofRules(t *testing.T) {
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
	ip := netip.MustParseAddr
	claims := Claims{
		ip("10.0.0.2"):  {"veth1"},
		ip("10.0.0.3"):  {"cali3"},
		ip("10.0.0.4"):  {"veth9"},
		ip("10.0.0.5"):  {"veth1", "veth2"},
		ip("fd00::2"):   {"veth1"},
		ip("10.0.0.10"): nil,
	}
	c := `-m comment --comment "metaconceal anti-spoof"`
	for _, tc := range []struct {
		v6        bool
		rules     []string
		protected []netip.Addr
	}{
		{false, []string{
			"-A METACONCEAL-SPOOF -s 10.0.0.2/32 -m physdev --physdev-in veth1 " + c + " -j RETURN",
			"-A METACONCEAL-SPOOF -s 10.0.0.2/32 " + c + " -j DROP",
			"-A METACONCEAL-SPOOF -s 10.0.0.3/32 -i cali3 " + c + " -j RETURN",
			"-A METACONCEAL-SPOOF -s 10.0.0.3/32 " + c + " -j DROP",
			"-A METACONCEAL-SPOOF -s 10.0.0.5/32 -m physdev --physdev-in veth1 " + c + " -j RETURN",
			"-A METACONCEAL-SPOOF -s 10.0.0.5/32 -m physdev --physdev-in veth2 " + c + " -j RETURN",
			"-A METACONCEAL-SPOOF -s 10.0.0.5/32 " + c + " -j DROP",
		}, []netip.Addr{ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.5")}},
		{true, []string{
			"-A METACONCEAL-SPOOF -s fd00::2/128 -m physdev --physdev-in veth1 " + c + " -j RETURN",
			"-A METACONCEAL-SPOOF -s fd00::2/128 " + c + " -j DROP",
		}, []netip.Addr{ip("fd00::2")}},
	} {
		rules, prot, problems := spoofRules(tc.v6, claims, resolve)
		if !slices.Equal(rules, tc.rules) {
			t.Errorf("v6=%v rules:\n%s\nwant\n%s", tc.v6, strings.Join(rules, "\n"), strings.Join(tc.rules, "\n"))
		}
		var got []netip.Addr
		for a := range prot {
			got = append(got, a)
		}
		slices.SortFunc(got, func(a, b netip.Addr) int { return a.Compare(b) })
		if !slices.Equal(got, tc.protected) {
			t.Errorf("v6=%v protected %v, want %v (an IP without a usable interface is never protected)", tc.v6, got, tc.protected)
		}
		if !tc.v6 && len(problems[ip("10.0.0.4")]) == 0 {
			t.Errorf("the gone interface of 10.0.0.4 is not reported: %v", problems)
		}
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
