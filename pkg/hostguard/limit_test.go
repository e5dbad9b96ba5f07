package hostguard

import (
	"net/netip"
	"strings"
	"testing"
)

// The limit chain is written only when a rate is set: one hashlimit rule per listen
// address of the family (the proxy's and the relay's), and one jump from INPUT for
// SYNs that do not arrive on lo; off, an existing chain is flushed and deleted.
func TestLimitPayload(t *testing.T) {
	t.Parallel()
	base := Config{
		ListenAddrs:     []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988"), netip.MustParseAddrPort("[fd20:ce::252]:988")},
		ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
		MetadataAddrs:   []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")},
	}
	for _, tc := range []struct {
		name        string
		rate, burst uint32
		exists      bool
		want        map[string]int // substring -> count in the IPv4 payload
	}{
		{"on", 100, 200, false, map[string]int{
			":" + ChainLimit + " - [0:0]": 1,
			"-A " + ChainLimit + " -d 169.254.169.252/32 -p tcp -m tcp --dport 988 -m hashlimit --hashlimit-above 100/sec --hashlimit-burst 200 --hashlimit-mode srcip --hashlimit-name mcgb0-988 --hashlimit-htable-size 8192 --hashlimit-htable-max 65536": 1,
			"-A " + ChainLimit + " -d 169.254.169.252/32 -p tcp -m tcp --dport 987 -m hashlimit --hashlimit-above 100/sec --hashlimit-burst 200 --hashlimit-mode srcip --hashlimit-name mcgb1-987 --hashlimit-htable-size 8192 --hashlimit-htable-max 65536": 1,
			"-A " + ChainLimit + " -d 169.254.169.252/32 -p tcp -m tcp --dport 984 -m hashlimit --hashlimit-above 100/sec --hashlimit-burst 200 --hashlimit-mode srcip --hashlimit-name mcgb2-984 --hashlimit-htable-size 8192 --hashlimit-htable-max 65536": 1,
			"-I INPUT 1 ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN": 1,
			"*raw\n:" + ChainSource + " - [0:0]\n-F " + ChainSource + "\n" +
				"-A " + ChainSource + " -d 169.254.169.254/32 -p tcp -m multiport --dports 80,8080 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-A " + ChainSource + " -d 169.254.169.252/32 -p tcp -m tcp --dport 988 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-A " + ChainSource + " -d 169.254.169.252/32 -p tcp -m tcp --dport 987 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-A " + ChainSource + " -d 169.254.169.252/32 -p tcp -m tcp --dport 984 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-A " + ChainSource + " -d 169.254.169.252/32 -p tcp -m tcp --dport 985 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-A " + ChainSource + " -d 169.254.169.252/32 -p tcp -m tcp --dport 986 -m rpfilter --invert -m comment --comment \"metaconceal host guard\" -j DROP\n" +
				"-I PREROUTING 1 ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment \"metaconceal host guard\" -j " + ChainSource + "\nCOMMIT\n": 1,
			"-X " + ChainLimit: 0,
		}},
		{"off", 0, 0, false, map[string]int{ChainLimit: 0, ChainSource: 0, "*raw": 0}},
		{"off, left by an earlier install", 0, 0, true, map[string]int{
			":" + ChainLimit: 0,
			"-F " + ChainLimit + "\n-X " + ChainLimit: 1,
			"-j " + ChainLimit:                        0,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := base
			cfg.ConnRate, cfg.ConnBurst = tc.rate, tc.burst
			n, err := cfg.normalized()
			if err != nil {
				t.Fatal(err)
			}
			fams := families(n)
			v4 := fams[0]
			v4.limitExists = tc.exists
			p := v4.installPayload(nil)
			for sub, want := range tc.want {
				if got := strings.Count(p, sub); got != want {
					t.Errorf("%d of %q in the payload, want %d:\n%s", got, sub, want, p)
				}
			}
			if tc.rate > 0 {
				p6 := fams[1].installPayload(nil)
				if !strings.Contains(p6, "-A "+ChainLimit+" -d fd20:ce::252/128 -p tcp -m tcp --dport 988 ") || strings.Count(p6, "-A "+ChainLimit) != 3 {
					t.Errorf("IPv6 payload: want three rules, for fd20:ce::252:988 and its attested ports 984 and 985 (no IPv6 relay):\n%s", p6)
				}
			}
		})
	}
}

func TestValidateConnLimit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rate, burst uint32
		ok          bool
	}{
		{0, 0, true}, {0, 99999, true}, {100, 200, true}, {1, 1, true}, {1_000_000, 10_000, true},
		{100, 0, false}, {100, 10_001, false}, {1_000_001, 5, false},
	} {
		err := validateConnLimit(tc.rate, tc.burst)
		if (err == nil) != tc.ok {
			t.Errorf("validateConnLimit(%d, %d) = %v, want ok %v", tc.rate, tc.burst, err, tc.ok)
		}
	}
}

// Rates are written as iptables-save prints them back (measured with iptables 1.8.9,
// nf_tables and legacy).
func TestSavedRate(t *testing.T) {
	t.Parallel()
	for rate, want := range map[uint32]uint32{1: 1, 3: 3, 100: 100, 333: 333, 3000: 3003, 7777: 7812, 50_000: 50_000, 123_456: 125_000, 999_999: 1_000_000, 1_000_000: 1_000_000} {
		if got := savedRate(rate); got != want {
			t.Errorf("savedRate(%d) = %d, want %d", rate, got, want)
		}
	}
}
