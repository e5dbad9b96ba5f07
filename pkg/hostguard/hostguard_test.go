package hostguard

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	listen := []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"no listen address", Config{}, "no listen address"},
		{"zero port", Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:0")}}, "non-zero port"},
		{"unspecified listen", Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:988")}}, "specific address"},
		{"unspecified metadata", Config{ListenAddrs: listen, MetadataAddrs: []netip.Addr{netip.MustParseAddr("::")}}, "not a specific address"},
		{"bad backend", Config{ListenAddrs: listen, Backend: "iptables-ng"}, `backend "iptables-ng"`},
		{"loopback DNAT target", Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:988"), listen[0]}}, "loopback"},
		{"loopback after the target", Config{ListenAddrs: append(slices.Clone(listen), netip.MustParseAddrPort("127.0.0.1:988"))}, ""},
		{"ok", Config{ListenAddrs: listen}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := tc.cfg.normalized()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if got.MetadataPort != 80 || len(got.MetadataAddrs) != 1 || got.MetadataAddrs[0] != DefaultMetadataAddr {
					t.Errorf("defaults not applied: %+v", got)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestInstallPayload(t *testing.T) {
	t.Parallel()
	cfg, err := Config{
		ListenAddrs:   []netip.AddrPort{netip.MustParseAddrPort("[fd00::252]:988"), netip.MustParseAddrPort("169.254.169.252:988"), netip.MustParseAddrPort("169.254.169.251:988")},
		MetadataAddrs: []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")},
		Backend:       BackendLegacy,
	}.normalized()
	if err != nil {
		t.Fatal(err)
	}
	fams := families(cfg)
	v4, v6 := fams[0], fams[1]
	if v4.restore != "iptables-legacy-restore" || v6.restore != "ip6tables-legacy-restore" {
		t.Errorf("restore binaries %q %q", v4.restore, v6.restore)
	}
	stale := `-D FORWARD -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD`
	p4 := v4.installPayload(map[string][]string{"filter": {stale}})
	for _, want := range []string{
		"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \"metaconceal host guard\" -j DNAT --to-destination 169.254.169.252:988\n",
		"-I PREROUTING 1 -m comment --comment \"metaconceal host guard\" -j METACONCEAL-GUARD\n",
		"-I INPUT 1 ! -i lo -m comment --comment \"metaconceal host guard\" -j METACONCEAL-GUARD\n",
		"-A METACONCEAL-GUARD -d 169.254.169.254/32 -m comment --comment \"metaconceal host guard\" -j REJECT --reject-with icmp-port-unreachable\n",
		"*filter\n:METACONCEAL-GUARD - [0:0]\n-F METACONCEAL-GUARD\n",
		stale + "\n-I FORWARD 1 ",
	} {
		if !strings.Contains(p4, want) {
			t.Errorf("IPv4 payload lacks %q:\n%s", want, p4)
		}
	}
	if strings.Contains(p4, "fd20") || strings.Contains(p4, "169.254.169.251") {
		t.Errorf("IPv4 payload has an address of the wrong family or a non-first listen address:\n%s", p4)
	}
	p6 := v6.installPayload(nil)
	if !strings.Contains(p6, "--to-destination [fd00::252]:988") || !strings.Contains(p6, "-d fd20:ce::254/128") || !strings.Contains(p6, "icmp6-port-unreachable") {
		t.Errorf("IPv6 payload:\n%s", p6)
	}
	if n := strings.Count(p6, "-I "); n != 3 || strings.Contains(p6, "-D ") {
		t.Errorf("payload without stale jumps: want 3 inserts and no delete:\n%s", p6)
	}
}
