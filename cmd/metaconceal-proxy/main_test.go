package main

import (
	"bytes"
	"io"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/cliflag"
)

func TestParseFlagsDefaults(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.listen, cliflag.List{defaultListen}) || o.upstream != "http://169.254.169.254" ||
		o.metricsListen != "127.0.0.1:989" || o.stateDir != "/run/metaconceal" || o.recursive != "deny" || o.hostGuard {
		t.Errorf("defaults = %+v", o)
	}
	o, err = parseFlags([]string{"--listen", "169.254.169.252:988", "--listen", "127.0.0.1:988,[fd00::1]:988"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if want := (cliflag.List{"169.254.169.252:988", "127.0.0.1:988", "[fd00::1]:988"}); !slices.Equal(o.listen, want) {
		t.Errorf("--listen = %v, want %v", o.listen, want)
	}
	if _, err := parseFlags([]string{"stray"}, io.Discard); err == nil {
		t.Error("a stray argument was accepted")
	}
}

func TestGuardConfig(t *testing.T) {
	// Not parallel: it replaces ipv6Enabled.
	orig := ipv6Enabled
	t.Cleanup(func() { ipv6Enabled = orig })
	ipv6Enabled = func() bool { return true }
	o := options{listen: cliflag.List{"169.254.169.252:988"}}
	cfg, err := guardConfig(o, &url.URL{Scheme: "http", Host: "169.254.169.254"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.ListenAddrs, []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}) ||
		!slices.Equal(cfg.MetadataAddrs, []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")}) || cfg.MetadataPort != 0 {
		t.Errorf("guard config = %+v (GCE's IPv6 metadata address must be guarded, rejected, even without an IPv6 listener)", cfg)
	}
	// Listening on IPv6 too (dual stack): the same addresses, now with an IPv6 DNAT target.
	cfg, err = guardConfig(options{listen: cliflag.List{"169.254.169.252:988", "[fd20:ce::252]:988"}}, &url.URL{Scheme: "http", Host: "169.254.169.254"})
	if err != nil || !slices.Equal(cfg.MetadataAddrs, []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")}) {
		t.Errorf("dual-stack guard config = %+v, %v", cfg, err)
	}
	cfg, err = guardConfig(options{listen: o.listen, metadataAddrs: cliflag.List{"10.9.9.9"}}, &url.URL{Scheme: "http", Host: "169.254.169.254"})
	if err != nil || !slices.Equal(cfg.MetadataAddrs, []netip.Addr{netip.MustParseAddr("10.9.9.9")}) {
		t.Errorf("--metadata-addr guard config = %+v, %v", cfg, err)
	}
	cfg, err = guardConfig(o, &url.URL{Scheme: "http", Host: "10.1.2.3:8080"})
	if err != nil || cfg.MetadataPort != 8080 {
		t.Errorf("guard config with a port = %+v, %v", cfg, err)
	}
	if _, err := guardConfig(options{listen: cliflag.List{"metadata.local:988"}}, &url.URL{Scheme: "http", Host: "x"}); err == nil {
		t.Error("a host name listen address was accepted for the guard")
	}
	// Without an IPv6 stack on the node, only the IPv4 address is guarded.
	ipv6Enabled = func() bool { return false }
	cfg, err = guardConfig(o, &url.URL{Scheme: "http", Host: "169.254.169.254"})
	if err != nil || !slices.Equal(cfg.MetadataAddrs, []netip.Addr{netip.MustParseAddr("169.254.169.254")}) {
		t.Errorf("guard config without IPv6 = %+v, %v", cfg, err)
	}
}

func TestRunFailsClearlyOnUnconfiguredAddress(t *testing.T) {
	t.Parallel()
	var stderr bytes.Buffer
	// 192.0.2.0/24 (TEST-NET-1) is not configured here; binding sends no packet.
	code := run([]string{"--listen", "192.0.2.77:988", "--metrics-listen", "", "--state-dir", t.TempDir()}, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "not configured on this host") {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
	if code := run([]string{"--recursive", "sometimes"}, &stderr); code != 1 {
		t.Errorf("bad --recursive: exit %d", code)
	}
	if code := run([]string{"--log-format", "xml"}, &stderr); code != 2 {
		t.Errorf("bad --log-format: exit %d", code)
	}
}
