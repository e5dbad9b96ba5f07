package hostguard

import (
	"errors"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

func TestConfigFrom(t *testing.T) {
	t.Parallel()
	gceUp := &url.URL{Scheme: "http", Host: "169.254.169.254"}
	v4, v6 := netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")
	proxy := netip.MustParseAddrPort("169.254.169.252:988")
	for _, tc := range []struct {
		name     string
		s        Settings
		listen   []netip.AddrPort
		metadata []netip.Addr
		port     uint16
		backend  xtables.Backend
		err      string
	}{
		{name: "GCE with IPv6: the IPv6 metadata address is guarded (rejected) without an IPv6 listener",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, IPv6: true},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4, v6}},
		{name: "dual stack listener",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988"), netip.MustParseAddrPort("[fd20:ce::252]:988")}, Upstream: gceUp, IPv6: true},
			listen: []netip.AddrPort{proxy, netip.MustParseAddrPort("[fd20:ce::252]:988")}, metadata: []netip.Addr{v4, v6}},
		{name: "node without IPv6",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4}},
		{name: "--metadata-addr replaces the defaults",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, MetadataAddrs: []netip.Addr{netip.MustParseAddr("10.9.9.9")}, IPv6: true},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{netip.MustParseAddr("10.9.9.9")}},
		{name: "upstream port and IP",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: &url.URL{Scheme: "http", Host: "10.1.2.3:8080"}},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{netip.MustParseAddr("10.1.2.3")}, port: 8080},
		{name: "upstream by name: GCE's address",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: &url.URL{Scheme: "http", Host: "metadata.google.internal"}},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4}},
		{name: "auto is the default backend",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, Backend: xtables.BackendAuto},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4}, backend: xtables.BackendAuto},
		{name: "empty backend: auto, the old default's spelling",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, Backend: ""},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4}, backend: xtables.BackendAuto},
		{name: "legacy backend",
			s:      Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, Backend: xtables.BackendLegacy},
			listen: []netip.AddrPort{proxy}, metadata: []netip.Addr{v4}, backend: xtables.BackendLegacy},
		{name: "invalid listen address", s: Settings{Listen: []netip.AddrPort{{}}, Upstream: gceUp}, err: "Listen:specific address"},
		{name: "no listen address", s: Settings{Upstream: gceUp}, err: "Listen:no listen address"},
		{name: "loopback first", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:988")}, Upstream: gceUp}, err: "Listen:loopback"},
		{name: "port zero", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:0")}, Upstream: gceUp}, err: "Listen:non-zero port"},
		{name: "loopback ALTS relay first", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, ALTSListen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:987")}, Upstream: gceUp}, err: "ALTSListen:loopback"},
		{name: "invalid metadata address", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, MetadataAddrs: []netip.Addr{{}}}, err: "MetadataAddrs:not a specific address"},
		{name: "unspecified metadata address", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, MetadataAddrs: []netip.Addr{netip.IPv4Unspecified()}}, err: "MetadataAddrs:not a specific address"},
		{name: "bad upstream port", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: &url.URL{Scheme: "http", Host: "10.1.2.3:0"}}, err: "Upstream:upstream port \"0\""},
		{name: "no upstream", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}, err: "Upstream:upstream"},
		{name: "connection rate too fast", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, ConnRate: 2_000_000, ConnBurst: 5}, err: "ConnRate:connection rate 2000000"},
		{name: "connection rate without a burst", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, ConnRate: 100}, err: "ConnBurst:connection burst 0"},
		{name: "connection burst too large", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, ConnRate: 100, ConnBurst: 10_001}, err: "ConnBurst:connection burst 10001"},
		{name: "unknown backend", s: Settings{Listen: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Upstream: gceUp, Backend: xtables.Backend("ebpf")}, err: "Backend:ebpf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ConfigFrom(tc.s)
			if tc.err != "" {
				// The error names the value; SettingError names the field.
				setting, text, _ := strings.Cut(tc.err, ":")
				var se *SettingError
				if !errors.As(err, &se) || se.Setting != setting || !strings.Contains(err.Error(), text) {
					t.Fatalf("ConfigFrom(%+v) = %+v, %v; want a SettingError for %s naming %q", tc.s, cfg, err, setting, text)
				}
				if strings.Contains(err.Error(), "--") {
					t.Errorf("ConfigFrom error %q names a command-line flag", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.backend == "" {
				tc.backend = xtables.BackendAuto // every case without a backend gets the default
			}
			if !slices.Equal(cfg.ListenAddrs, tc.listen) || !slices.Equal(cfg.MetadataAddrs, tc.metadata) ||
				cfg.MetadataPort != tc.port || cfg.Backend != tc.backend {
				t.Errorf("ConfigFrom(%+v) = %+v; want listen %v, metadata %v, port %d, backend %q", tc.s, cfg, tc.listen, tc.metadata, tc.port, tc.backend)
			}
			if cfg.ConnRate != 0 || cfg.ConnBurst != 0 {
				t.Errorf("ConfigFrom(%+v) = %+v; want no connection limit without a rate", tc.s, cfg)
			}
		})
	}
}
