package hostguard

import (
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/xtables"
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
		Backend:       xtables.BackendLegacy,
	}.normalized()
	if err != nil {
		t.Fatal(err)
	}
	fams := families(cfg)
	v4, v6 := fams[0], fams[1]
	if v4.names.Restore != "iptables-legacy-restore" || v6.names.Restore != "ip6tables-legacy-restore" {
		t.Errorf("restore programs %q %q", v4.names.Restore, v6.names.Restore)
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
	if n := strings.Count(p6, "-I "); n != len(baseHooks) || strings.Contains(p6, "-D ") {
		t.Errorf("payload without stale jumps: want %d inserts and no delete:\n%s", len(baseHooks), p6)
	}
}

// Every metadata address gets GCE's port treatment, in order: DNS and NTP pass, 80 goes
// to the proxy, 8080 to the ALTS relay (or is rejected without one), the rest is
// rejected; and TCP from the server's ports that opens a flow is rejected.
func TestInstallPayloadPorts(t *testing.T) {
	t.Parallel()
	const c = ` -m comment --comment "metaconceal host guard"`
	for _, tc := range []struct {
		name     string
		alts     []netip.AddrPort
		want     []string
		wantNone string
	}{
		{"relay", []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}, []string{
			"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 80" + c + " -j DNAT --to-destination 169.254.169.252:988\n" +
				"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 8080" + c + " -j DNAT --to-destination 169.254.169.252:987\n",
		}, ""},
		{"no relay", nil, nil, "--dport 8080"},
	} {
		cfg, err := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, ALTSListenAddrs: tc.alts}.normalized()
		if err != nil {
			t.Fatal(err)
		}
		p := families(cfg)[0].installPayload(nil)
		want := append(tc.want,
			"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p udp -m udp --dport 53"+c+" -j RETURN\n"+
				"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 53"+c+" -j RETURN\n"+
				"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p udp -m udp --dport 123"+c+" -j RETURN\n"+
				"-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp"+c+" -j REJECT --reject-with tcp-reset\n"+
				"-A METACONCEAL-GUARD -d 169.254.169.254/32"+c+" -j REJECT --reject-with icmp-port-unreachable\n",
			"-A METACONCEAL-GUARD-FROM -s 169.254.169.254/32 -p tcp -m multiport --sports 80,8080 -m conntrack --ctdir ORIGINAL"+c+" -j REJECT --reject-with tcp-reset\n"+
				"-A METACONCEAL-GUARD-FROM -s 169.254.169.254/32 -p tcp -m multiport --sports 80,8080 -m conntrack --ctstate INVALID"+c+" -j REJECT --reject-with tcp-reset\n",
			"-I OUTPUT 1 ! -o lo"+c+" -j METACONCEAL-GUARD-FROM\n",
			"-I FORWARD 1"+c+" -j METACONCEAL-GUARD-FROM\n",
		)
		for _, w := range want {
			if !strings.Contains(p, w) {
				t.Errorf("%s: payload lacks\n%s\nin\n%s", tc.name, w, p)
			}
		}
		if tc.wantNone != "" && strings.Contains(p, tc.wantNone) {
			t.Errorf("%s: payload has %q:\n%s", tc.name, tc.wantNone, p)
		}
	}
	if _, err := (Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
		ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:987")}}).normalized(); err == nil || !strings.Contains(err.Error(), "ALTS relay") {
		t.Errorf("a loopback ALTS relay target was accepted (%v)", err)
	}
}

// The ALTS relay's listen addresses reach the guard's config as the 8080 DNAT
// targets; a bad one is reported before anything is installed.
func TestConfigFromALTSListen(t *testing.T) {
	t.Parallel()
	up := &url.URL{Scheme: "http", Host: "169.254.169.254"}
	listen := []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}
	cfg, err := ConfigFrom(Settings{Listen: listen, ALTSListen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}, Upstream: up})
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}; !slices.Equal(cfg.ALTSListenAddrs, want) {
		t.Errorf("ALTS targets %v, want %v", cfg.ALTSListenAddrs, want)
	}
	for _, bad := range []netip.AddrPort{{}, netip.MustParseAddrPort("127.0.0.1:987"), netip.MustParseAddrPort("169.254.169.252:0")} {
		if _, err := ConfigFrom(Settings{Listen: listen, ALTSListen: []netip.AddrPort{bad}, Upstream: up}); err == nil {
			t.Errorf("ALTS relay address %v accepted", bad)
		}
	}
}
