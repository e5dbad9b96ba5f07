package main

import (
	"bytes"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

func TestParseFlagsDefaults(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.listen, cliflag.List{defaultListen}) || o.upstream != "http://169.254.169.254" ||
		o.metricsListen != "127.0.0.1:989" || o.stateDir != "/run/metaconceal" || o.recursive != "deny" || !o.hostGuard ||
		o.iptablesBackend != "auto" {
		t.Errorf("defaults = %+v (the host guard is on by default)", o)
	}
	if o, err := parseFlags([]string{"--host-guard=false"}, io.Discard); err != nil || o.hostGuard {
		t.Errorf("--host-guard=false: %+v, %v", o, err)
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

// --iptables-backend takes the plugin's names (pkg/xtables): auto, its old spelling
// (empty), nft and legacy reach the host guard's config; anything else is refused.
func TestIptablesBackendFlag(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		arg     string
		want    xtables.Backend
		wantErr bool
	}{
		{"--iptables-backend=auto", xtables.BackendAuto, false},
		{"--iptables-backend=", xtables.BackendAuto, false},
		{"--iptables-backend=nft", xtables.BackendNFT, false},
		{"--iptables-backend=legacy", xtables.BackendLegacy, false},
		{"--iptables-backend=ebpf", "", true},
	} {
		o, err := parseFlags([]string{tc.arg}, io.Discard)
		if err != nil {
			t.Fatalf("%s: %v", tc.arg, err)
		}
		upstream, err := parseUpstream(o.upstream)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := guardConfig(o, upstream)
		switch {
		case tc.wantErr && (err == nil || !strings.Contains(err.Error(), "--iptables-backend")):
			t.Errorf("%s: %v, want an error naming --iptables-backend", tc.arg, err)
		case !tc.wantErr && (err != nil || cfg.Backend != tc.want):
			t.Errorf("%s: backend %q, %v; want %q", tc.arg, cfg.Backend, err, tc.want)
		}
	}
}

func TestRunFailsClearlyOnUnconfiguredAddress(t *testing.T) {
	t.Parallel()
	var stderr bytes.Buffer
	// 192.0.2.0/24 (TEST-NET-1) is not configured here; binding sends no packet.
	// The machine's own netns: --host-guard=false on every run (cmd/metaconceal-proxy's
	// privileged tests run the guard in a simulated node).
	code := run([]string{"--host-guard=false", "--listen", "192.0.2.77:988", "--metrics-listen", "", "--state-dir", t.TempDir()}, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "not configured on this host") {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "host guard off") {
		t.Errorf("--host-guard=false logged no warning: %q", stderr.String())
	}
	if code := run([]string{"--host-guard=false", "--recursive", "sometimes"}, &stderr); code != 1 {
		t.Errorf("bad --recursive: exit %d", code)
	}
	if code := run([]string{"--host-guard=false", "--log-format", "xml"}, &stderr); code != 2 {
		t.Errorf("bad --log-format: exit %d", code)
	}
}

func TestSubcommandFlags(t *testing.T) {
	t.Parallel()
	o, err := parseRemoveFlags([]string{"--listen", "169.254.169.252:988,[fd20:ce::252]:988", "--upstream", "http://10.1.2.3:8080",
		"--metadata-addr", "10.1.2.3", "--iptables-backend", "legacy"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.listen, cliflag.List{"169.254.169.252:988", "[fd20:ce::252]:988"}) || o.upstream != "http://10.1.2.3:8080" ||
		!slices.Equal(o.metadataAddrs, cliflag.List{"10.1.2.3"}) || o.iptablesBackend != "legacy" {
		t.Errorf("remove-host-guard flags = %+v", o)
	}
	if o, err := parseRemoveFlags(nil, io.Discard); err != nil || !slices.Equal(o.listen, cliflag.List{defaultListen}) {
		t.Errorf("remove-host-guard defaults = %+v, %v", o, err)
	}
	// Serving flags are not remove-host-guard's; a stray argument is refused. Both fail
	// in flag parsing, before anything could be removed.
	for _, args := range [][]string{{"remove-host-guard", "--policy", "x"}, {"remove-host-guard", "now"}, {"remove-host-guard", "--log-format", "xml"}} {
		var stderr bytes.Buffer
		if code := dispatch(args, io.Discard, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, code, stderr.String())
		}
	}
	var stderr bytes.Buffer
	if code := dispatch([]string{"remove-host-guard", "--help"}, io.Discard, &stderr); code != 0 || !strings.Contains(stderr.String(), "usage: metaconceal-proxy remove-host-guard") {
		t.Errorf("remove-host-guard --help: exit %d, %q", code, stderr.String())
	}
	stderr.Reset()
	if code := dispatch([]string{"doctor", "--help"}, io.Discard, &stderr); !strings.Contains(stderr.String(), "usage: metaconceal-proxy doctor") {
		t.Errorf("doctor --help: exit %d, %q", code, stderr.String())
	}
}

func TestParseUpstream(t *testing.T) {
	t.Parallel()
	for raw, ok := range map[string]bool{
		"http://169.254.169.254": true, "https://metadata.google.internal/": true, "http://10.1.2.3:8080": true,
		"169.254.169.254": false, "ftp://x": false, "http://": false, "http://x/computeMetadata/v1/": false,
		"http://x?a=b": false, "http://u:p@x": false, "http://[::1": false,
	} {
		if _, err := parseUpstream(raw); (err == nil) != ok {
			t.Errorf("parseUpstream(%q) err = %v, want ok=%v", raw, err, ok)
		}
	}
}

// Every value the app refuses reaches the operator with the flag to change
// (proxyapp's errors name the value; namingFlag adds the flag).
func TestFlagErrorsNameTheFlag(t *testing.T) {
	t.Parallel()
	base := []string{"--host-guard=false", "--state-dir", t.TempDir()}
	for _, args := range [][]string{
		{"--listen", "169.254.169.252"},
		{"--listen", "metadata.local:988"},
		{"--alts-listen", "no-port"},
		{"--metrics-listen", "localhost"},
		{"--shutdown-grace", "-1s"},
		{"--cache-ttl", "0s"},
		{"--cache-ttl", "11m"},
		{"--alts-handshake-timeout", "0s"},
		{"--alts-idle-timeout", "-1s"},
		{"--recursive", "sometimes"},
		{"--upstream", "http://x/computeMetadata/v1/"},
	} {
		f, err := parseFlags(append(append([]string{}, base...), args...), io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if _, err := newApp(f, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), args[0]) {
			t.Errorf("%v: err = %v, want one naming %s", args, err, args[0])
		}
	}
	f, err := parseFlags(base, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newApp(f, slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("defaults refused: %v", err)
	}
}
