package proxyapp

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// Options are everything the proxy runs with, already parsed. Every field is set
// explicitly (cmd/metaconceal-proxy fills them from its flags and their defaults).
type Options struct {
	// Listen are the addresses the proxy serves pods on; at least one.
	Listen []netip.AddrPort
	// MetricsListen is where /metrics, /healthz and /readyz are served, as net.Listen
	// takes it (the host may be empty or a name); empty turns them off.
	MetricsListen string
	// ProbeSocket, when set, is a unix socket path on which /healthz and /readyz (and
	// /metrics) are also served, for exec probes that must reach this instance and not
	// another one sharing MetricsListen through SO_REUSEPORT.
	ProbeSocket string
	// ProcSys, when set, is where the node's /proc/sys is, through which Run sets
	// net.ipv4.tcp_migrate_req=1 in the netns of Run's thread: set it only where Run
	// runs in the node's netns (as with Guard); empty leaves it alone.
	ProcSys string
	// Upstream is the real metadata server, scheme and host only.
	Upstream *url.URL
	// UpstreamTimeout bounds an upstream answer that is not a long poll.
	UpstreamTimeout time.Duration
	// StateDir is the CNI plugin's state dir, which names the pod behind a source IP.
	StateDir string
	// Policy is the request policy (pkg/policy; reading a policy file is the caller's).
	Policy policy.Config
	// Cache configures the answer cache (proxy.CacheConfig.Validate); FactTTL is
	// required.
	Cache proxy.CacheConfig
	// Limits are the per-pod and global limits.
	Limits proxy.Limits
	// ALTS is the ALTS relay.
	ALTS ALTSOptions
	// Guard, when set, is the host guard, installed before listening and left in
	// place on exit; nil runs without it (tests, benchmarks only).
	Guard *GuardOptions
	// Events, when set, records Events on the pods behind concealed and denied
	// requests; Component defaults to "metaconceal-proxy" and Log to Options.Log.
	Events *podevents.Config
	// ShutdownGrace is how long open ordinary requests may finish once Run's context
	// is done, before their connections are closed.
	ShutdownGrace time.Duration
	// Collectors are registered beside the proxy's metrics (e.g. the binary's own).
	Collectors []prometheus.Collector
	// Log receives what happens; nil discards.
	Log *slog.Logger
}

// ALTSOptions configure the ALTS relay (pkg/altsrelay).
type ALTSOptions struct {
	// Listen are the relay's addresses; none turns the relay off.
	Listen []netip.AddrPort
	// HandshakeTimeout and IdleTimeout are the relay's deadlines; both more than 0.
	HandshakeTimeout, IdleTimeout time.Duration
}

// RefreshInterval is how often the pod index looks at the state dir (one stat) and,
// when it changed, re-reads the records and re-applies the attestation rules; inotify
// wakes it at once in between (pkg/podindex, refresh.go).
const RefreshInterval = 100 * time.Millisecond

// GuardOptions configure the host guard (pkg/hostguard).
type GuardOptions struct {
	// Config is the guard's config; its ListenAddrs and ALTSListenAddrs are replaced
	// by Options.Listen and Options.ALTS.Listen, so the guard redirects to where the
	// proxy listens.
	Config hostguard.Config
	// Reconcile is how often the guard is checked and repaired; 0 is
	// hostguard.DefaultReconcileInterval.
	Reconcile time.Duration
	// Generation is this proxy's generation: a guard written by a newer one, alive,
	// is left alone (hostguard.Options.Generation).
	Generation uint64
}

// An OptionError is an Options value that cannot be used. Option names the field
// ("Cache.FactTTL"), so that a caller can say which of its settings to change; the
// error itself names the value.
type OptionError struct {
	Option string
	Err    error
}

func (e *OptionError) Error() string { return e.Err.Error() }
func (e *OptionError) Unwrap() error { return e.Err }

func optionErr(option, format string, args ...any) error {
	return &OptionError{Option: option, Err: fmt.Errorf(format, args...)}
}

// validate checks what New does not leave to the parts it builds.
func (o Options) validate() error {
	if len(o.Listen) == 0 {
		return optionErr("Listen", "no listen address")
	}
	for _, ap := range o.Listen {
		if !ap.IsValid() {
			return optionErr("Listen", "listen address %v: want IP:port", ap)
		}
	}
	for _, ap := range o.ALTS.Listen {
		if !ap.IsValid() {
			return optionErr("ALTS.Listen", "ALTS relay address %v: want IP:port", ap)
		}
	}
	if o.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(o.MetricsListen); err != nil {
			return optionErr("MetricsListen", "metrics address %q: %w", o.MetricsListen, err)
		}
	}
	if err := proxy.ValidateUpstream(o.Upstream); err != nil {
		return &OptionError{Option: "Upstream", Err: err}
	}
	if o.ShutdownGrace < 0 {
		return optionErr("ShutdownGrace", "shutdown grace %s: want 0 or more", o.ShutdownGrace)
	}
	if o.Cache.FactTTL == 0 { // the proxy's default; here every option is explicit
		return optionErr("Cache", "cache TTL 0s: want more than 0")
	}
	if err := o.Cache.Validate(); err != nil {
		return &OptionError{Option: "Cache", Err: err}
	}
	if err := o.Limits.Validate(); err != nil {
		return &OptionError{Option: "Limits", Err: err}
	}
	if o.ALTS.HandshakeTimeout <= 0 {
		return optionErr("ALTS.HandshakeTimeout", "ALTS handshake timeout %s: want more than 0", o.ALTS.HandshakeTimeout)
	}
	if o.ALTS.IdleTimeout <= 0 {
		return optionErr("ALTS.IdleTimeout", "ALTS idle timeout %s: want more than 0", o.ALTS.IdleTimeout)
	}
	return nil
}
