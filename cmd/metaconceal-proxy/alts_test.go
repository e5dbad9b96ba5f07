package main

import (
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/altsrelay"
)

// --alts-listen defaults to GKE's relay address, feeds the host guard's 8080 DNAT, and
// an empty value turns the relay (and the guard's DNAT of 8080) off.
func TestALTSListenFlag(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.altsListen) != 1 || o.altsListen[0] != "169.254.169.252:987" {
		t.Errorf("--alts-listen default %q", o.altsListen)
	}
	up, err := parseUpstream(o.upstream)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want []netip.AddrPort
	}{
		{nil, []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}},
		{[]string{"--alts-listen", "10.0.0.9:1987"}, []netip.AddrPort{netip.MustParseAddrPort("10.0.0.9:1987")}},
		{[]string{"--alts-listen", ""}, nil},
		{[]string{"--alts-listen", "169.254.169.252:987,[fd20:ce::252]:987"}, []netip.AddrPort{
			netip.MustParseAddrPort("169.254.169.252:987"), netip.MustParseAddrPort("[fd20:ce::252]:987")}},
	} {
		o, err := parseFlags(tc.args, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := guardConfig(o, up)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if !slices.Equal(cfg.ALTSListenAddrs, tc.want) {
			t.Errorf("%v: guard ALTS targets %v, want %v", tc.args, cfg.ALTSListenAddrs, tc.want)
		}
	}
	o, err = parseFlags([]string{"--alts-listen", "no-port"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.appOptions(slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "--alts-listen") {
		t.Errorf("appOptions accepted --alts-listen no-port (%v)", err)
	}
}

// --alts-handshake-timeout and --alts-idle-timeout default to the relay's defaults
// (proxyapp refuses values that are not positive: TestFlagErrorsNameTheFlag).
func TestALTSTimeoutFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.altsHandshakeTimeout != altsrelay.DefaultHandshakeTimeout || o.altsIdleTimeout != altsrelay.DefaultIdleTimeout {
		t.Errorf("defaults %v, %v", o.altsHandshakeTimeout, o.altsIdleTimeout)
	}
	o, err = parseFlags([]string{"--alts-handshake-timeout", "2s", "--alts-idle-timeout", "90s"}, io.Discard)
	if err != nil || o.altsHandshakeTimeout != 2*time.Second || o.altsIdleTimeout != 90*time.Second {
		t.Errorf("parsed %v, %v (%v)", o.altsHandshakeTimeout, o.altsIdleTimeout, err)
	}
}
