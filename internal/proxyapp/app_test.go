package proxyapp

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// valid returns Options that New accepts, on loopback, without the host guard.
func valid(t *testing.T) Options {
	return Options{
		Listen:   []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")},
		Upstream: &url.URL{Scheme: "http", Host: "127.0.0.1:1"},
		StateDir: t.TempDir(),
		Cache:    proxy.CacheConfig{FactTTL: proxy.DefaultFactTTL},
		Limits:   proxy.DefaultLimits,
		ALTS:     ALTSOptions{HandshakeTimeout: time.Second, IdleTimeout: time.Second},
	}
}

// New refuses every wrong option before building anything, with an OptionError that
// names the field and an error that names the value.
func TestNewRefusesOptions(t *testing.T) {
	t.Parallel()
	// New changes nothing in the netns: the guard is only built.
	gceProxy := gce.Proxy
	guardCfg := hostguard.Config{MetadataAddrs: []netip.Addr{hostguard.DefaultMetadataAddr}}
	for _, tc := range []struct {
		option, value string
		edit          func(*Options)
	}{
		{"Listen", "no listen address", func(o *Options) { o.Listen = nil }},
		{"Listen", "invalid AddrPort", func(o *Options) { o.Listen = []netip.AddrPort{{}} }},
		{"ALTS.Listen", "invalid AddrPort", func(o *Options) { o.ALTS.Listen = []netip.AddrPort{{}} }},
		{"MetricsListen", `"localhost"`, func(o *Options) { o.MetricsListen = "localhost" }},
		{"Upstream", "http:// or https:// URL", func(o *Options) { o.Upstream = nil }},
		{"Upstream", "scheme and host only", func(o *Options) {
			o.Upstream = &url.URL{Scheme: "http", Host: "10.0.0.1", Path: "/computeMetadata/v1/"}
		}},
		{"ShutdownGrace", "-1s", func(o *Options) { o.ShutdownGrace = -time.Second }},
		{"Cache", "0s", func(o *Options) { o.Cache.FactTTL = 0 }},
		{"Cache", "-1s", func(o *Options) { o.Cache.FactTTL = -time.Second }},
		{"Cache", "11m0s", func(o *Options) { o.Cache.FactTTL = 11 * time.Minute }},
		{"Limits", "burst of 0", func(o *Options) { o.Limits = proxy.Limits{PodRate: 1} }},
		{"ALTS.HandshakeTimeout", "0s", func(o *Options) { o.ALTS.HandshakeTimeout = 0 }},
		{"ALTS.IdleTimeout", "-1s", func(o *Options) { o.ALTS.IdleTimeout = -time.Second }},
		{"Policy", "policy file", func(o *Options) { o.Policy.File.ConcealPaths = []string{"../kube-env"} }},
		{"Guard.Reconcile", "1ms", func(o *Options) {
			o.Listen = []netip.AddrPort{gceProxy}
			o.Guard = &GuardOptions{Config: guardCfg, Reconcile: time.Millisecond}
		}},
		{"Guard.Config", "listen address", func(o *Options) {
			o.Listen = []netip.AddrPort{netip.MustParseAddrPort("[::1]:0")}
			o.Guard = &GuardOptions{Config: guardCfg}
		}},
		{"Guard.Config", "attested port 984", func(o *Options) {
			o.Listen = []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:984")}
			o.Guard = &GuardOptions{Config: guardCfg}
		}},
	} {
		o := valid(t)
		tc.edit(&o)
		_, err := New(o)
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Option != tc.option || !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(tc.value)) {
			t.Errorf("%s: New = %v; want an OptionError for %s naming %q", tc.option, err, tc.option, tc.value)
		}
	}
	o := valid(t)
	o.Listen = []netip.AddrPort{gceProxy}
	o.ALTS.Listen = []netip.AddrPort{gce.ALTSRelay}
	o.Guard = &GuardOptions{Config: guardCfg}
	a, err := New(o)
	if err != nil {
		t.Fatalf("valid options with a guard refused: %v", err)
	}
	// With the guard the app opens the attested listeners the guard's rules lead to;
	// without it none (every connection unattributed).
	var got []string
	for _, al := range a.attested {
		got = append(got, al.Ingress.String()+"@"+al.Addr.String())
	}
	if want := "attested@169.254.169.252:984 exposed@169.254.169.252:985 attested@169.254.169.252:986"; strings.Join(got, " ") != want {
		t.Errorf("attested listeners %q, want %q", got, want)
	}
	if a, err := New(valid(t)); err != nil {
		t.Errorf("valid options refused: %v", err)
	} else if len(a.attested) != 0 {
		t.Errorf("without the guard: attested listeners %+v; want none", a.attested)
	}
}

func TestCollectorsRegistered(t *testing.T) {
	t.Parallel()
	o := valid(t)
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "metaconceal_test_total", Help: "test"})
	o.Collectors = []prometheus.Collector{c}
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.metrics.Registry.Register(c); !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
		t.Errorf("collector not registered: registering it again gave %v", err)
	}
	// The process-wide collectors are the app's to register, not pkg/proxy's.
	families, err := a.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, f := range families {
		found[f.GetName()] = true
	}
	if !found["go_goroutines"] || !found["process_start_time_seconds"] {
		t.Error("the Go and process collectors are not registered")
	}
	o.Collectors = []prometheus.Collector{c, c}
	if _, err := New(o); err == nil {
		t.Error("a collector registered twice was accepted")
	}
}

// An address that is not on this host fails Run with the option that names it, and
// the listeners opened before it are closed.
func TestRunListenFailure(t *testing.T) {
	t.Parallel()
	o := valid(t)
	// 192.0.2.0/24 (TEST-NET-1) is not configured here; binding sends no packet.
	o.ALTS.Listen = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.77:987")}
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(context.Background())
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Option != "ALTS.Listen" || !errors.Is(err, proxy.ErrAddressNotConfigured) {
		t.Errorf("Run = %v; want an OptionError for ALTS.Listen wrapping ErrAddressNotConfigured", err)
	}
}

// freeAddr is a loopback address:port nobody listens on.
func freeAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// Run serves the proxy, the relay and the metrics server until its context is done,
// then shuts them all down and returns nil; the addresses are free again after.
func TestRunServesUntilCancelled(t *testing.T) {
	t.Parallel()
	o := valid(t)
	o.Listen = []netip.AddrPort{freeAddr(t)}
	o.ALTS.Listen = []netip.AddrPort{freeAddr(t)}
	o.MetricsListen = freeAddr(t).String()
	o.ShutdownGrace = time.Second
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var body string
	for range 200 {
		resp, err := http.Get("http://" + o.MetricsListen + "/healthz")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			break
		}
		select {
		case err := <-done:
			t.Fatalf("Run ended before serving: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if body != "ok\n" {
		t.Fatalf("/healthz answered %q", body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	for _, addr := range []string{o.Listen[0].String(), o.ALTS.Listen[0].String(), o.MetricsListen} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Errorf("%s still held after Run: %v", addr, err)
			continue
		}
		ln.Close()
	}
}
