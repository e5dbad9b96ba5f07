// Package proxyapp builds metaconceal-proxy from typed Options and runs it: the pod
// index (pkg/podindex), the policy (pkg/policy), the proxy handler and its server
// (pkg/proxy), the ALTS relay (pkg/altsrelay), the host guard and its reconciliation
// (pkg/hostguard), the metrics server and pod Events (pkg/podevents). New validates
// every option and builds what has no side effect; Run installs the guard, listens,
// serves until its context is done, and shuts down. cmd/metaconceal-proxy turns flags
// into Options; nothing here knows about flags.
package proxyapp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"

	"github.com/metaconceal/metaconceal/pkg/altsrelay"
	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// App is the proxy built from Options. Run it once.
type App struct {
	opts    Options
	log     *slog.Logger
	policy  *policy.Policy
	metrics *proxy.Metrics
	guard   *hostguard.Guard // nil without the host guard
	pods    *podindex.Index
	relay   *altsrelay.Relay // nil without ALTS listen addresses
	// attested are the listeners the guard's attestation rules send pods'
	// connections to (pkg/hostguard, attest.go); none without the guard, so that every
	// connection is then unattributed (fail closed).
	attested []hostguard.AttestedListener
	ready    readiness // what /readyz says besides the upstream (ready.go)
	// freshSeen: connections in StateNew, counted by countFresh.
	freshSeen sync.Map
}

// New validates o, every option before anything is changed, and builds the parts
// that have no side effect (no goroutine, no listener, nothing in the netns).
func New(o Options) (*App, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	a := &App{opts: o, log: o.Log}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	var err error
	if a.policy, err = policy.New(o.Policy); err != nil {
		return nil, &OptionError{Option: "Policy", Err: err}
	}
	a.metrics = proxy.NewMetrics()
	process := []prometheus.Collector{collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}
	for _, c := range append(process, o.Collectors...) {
		if err := a.metrics.Registry.Register(c); err != nil {
			return nil, fmt.Errorf("registering a collector: %w", err)
		}
	}
	var podOpts []podindex.Option
	if o.Guard != nil {
		cfg := o.Guard.Config
		cfg.ListenAddrs, cfg.ALTSListenAddrs = o.Listen, o.ALTS.Listen
		if err := cfg.Validate(); err != nil {
			return nil, &OptionError{Option: "Guard.Config", Err: err}
		}
		a.guard, err = hostguard.New(cfg, hostguard.Options{Interval: o.Guard.Reconcile, Log: a.log, Registerer: a.metrics.Registry, Generation: o.Guard.Generation})
		if err != nil { // the config is valid: what is left is the interval
			return nil, &OptionError{Option: "Guard.Reconcile", Err: err}
		}
		// The refresher keeps the attestation rules in line with the records.
		podOpts = append(podOpts, podindex.WithAttestor(a.guard.Spoof()))
		if a.attested, err = cfg.AttestedListeners(); err != nil {
			return nil, &OptionError{Option: "Guard.Config", Err: err}
		}
	}
	a.pods = podindex.New(o.StateDir, a.log, podOpts...)
	if len(o.ALTS.Listen) > 0 {
		a.relay, err = altsrelay.New(altsrelay.Config{
			Upstream:         net.JoinHostPort(o.Upstream.Hostname(), fmt.Sprint(gce.ALTSPort)),
			Pods:             a.pods,
			Log:              a.log,
			Registerer:       a.metrics.Registry,
			HandshakeTimeout: o.ALTS.HandshakeTimeout,
			IdleTimeout:      o.ALTS.IdleTimeout,
		})
		if err != nil {
			return nil, fmt.Errorf("ALTS relay: %w", err)
		}
	}
	return a, nil
}

// Run serves until ctx is done or a listener fails, then shuts down (see shutdown):
// /readyz fails at once, the pods' and the relay's listeners close first (with
// SO_REUSEPORT the next instance's listeners take every new connection), held long
// polls are handed back, what is in flight is answered within ShutdownGrace, idle
// keep-alive connections are closed, and the metrics server stops last; then the
// guard's reconciliation stops. The host guard is never removed: a restart opens no
// window (`metaconceal-proxy remove-host-guard` takes it away). /readyz succeeds only
// once every listener accepts and the guard was reconciled once. Run returns nil after
// a shutdown asked for by ctx, or the listener's error.
func (a *App) Run(ctx context.Context) error {
	o, log := a.opts, a.log
	notify, stopEvents, err := a.startEvents()
	if err != nil {
		return err
	}
	defer stopEvents()
	handler, err := proxy.New(proxy.Config{
		Notify:          notify,
		Upstream:        o.Upstream,
		Policy:          a.policy,
		Pods:            a.pods,
		Log:             log,
		Metrics:         a.metrics,
		UpstreamTimeout: o.UpstreamTimeout,
		Cache:           o.Cache,
		Limits:          o.Limits,
	})
	if err != nil {
		return err
	}
	defer handler.Close()

	// The background loops (the guard's reconciliation, the pod index refresher)
	// stop once serving has drained, or when ctx is done.
	g, serving := errgroup.WithContext(ctx)
	loops, stopLoops := context.WithCancel(ctx)
	defer stopLoops()
	if a.guard == nil {
		a.ready.guardOK.Store(true)
	} else {
		// Installed after every option was validated and before listening: it also
		// puts the listen addresses on lo.
		if err := a.guard.Install(ctx); err != nil {
			return fmt.Errorf("install host guard: %w", err)
		}
		// One full pass before readiness: the guard as installed is checked whole.
		if _, err := a.guard.Reconcile(ctx); err != nil {
			return fmt.Errorf("first reconciliation of the host guard: %w", err)
		}
		g.Go(func() error {
			defer a.guard.Start(loops)() // re-asserted every Reconcile until the loops stop
			<-loops.Done()
			return nil
		})
		// Pod identity and the attestation rules follow the state dir in the
		// refresher, never on an accept: a new pod is attested one iptables-restore
		// after its record appears (inotify; the interval is the fallback).
		a.pods.Refresh(true)
		g.Go(func() error { a.pods.Run(loops, RefreshInterval, int(time.Minute/RefreshInterval)); return nil })
		a.ready.guardOK.Store(true)
	}
	a.setMigrateReq()
	lns, err := a.listen(ctx)
	if err != nil {
		stopLoops()
		_ = g.Wait()
		return err
	}

	srv := proxy.NewServer(handler, log)
	fresh := a.countFresh(srv)
	for _, ln := range lns.proxy {
		g.Go(func() error { // per-pod connection caps
			err := srv.Serve(handler.Listener(ln))
			if a.ready.draining.Load() && errors.Is(err, net.ErrClosed) {
				return nil // shutdown closed the listener itself, before srv.Shutdown
			}
			return served(err)
		})
	}
	for _, ln := range lns.alts {
		g.Go(func() error { return served(a.relay.Serve(ln)) })
	}
	podListeners := lns.proxy // closed first on shutdown, before net/http's Shutdown
	for _, al := range lns.attested {
		if al.Relay {
			g.Go(func() error { return served(a.relay.ServeIngress(al.ln, al.Ingress)) })
			continue
		}
		podListeners = append(podListeners, al.ln)
		g.Go(func() error {
			err := srv.Serve(handler.ListenerFor(al.ln, al.Ingress))
			if a.ready.draining.Load() && errors.Is(err, net.ErrClosed) {
				return nil // shutdown closed the listener itself, before srv.Shutdown
			}
			return served(err)
		})
	}
	var admin *http.Server
	if len(lns.admin) > 0 {
		admin = proxy.NewAdminServer(handler, log)
		admin.Handler = a.ready.adminHandler(handler, admin.Handler)
		for _, ln := range lns.admin {
			g.Go(func() error { return served(admin.Serve(ln)) })
		}
	}
	log.Info("metaconceal-proxy serving", "listen", o.Listen, "upstream", o.Upstream.Redacted(),
		"alts_listen", o.ALTS.Listen, "metrics", o.MetricsListen, "probe_socket", o.ProbeSocket, "recursive", o.Policy.Recursive.String(), "host_guard", a.guard != nil)

	<-serving.Done()
	a.ready.draining.Store(true)
	if ctx.Err() != nil {
		log.Info("shutting down", "grace", o.ShutdownGrace.String())
	} else {
		log.Error("listener failed", "err", context.Cause(serving))
	}
	a.shutdown(handler, srv, admin, podListeners, fresh)
	stopLoops()
	return g.Wait()
}

// startEvents starts the Event recorder, when asked for; the notifier is nil without.
func (a *App) startEvents() (proxy.BlockNotifier, func(), error) {
	if a.opts.Events == nil {
		return nil, func() {}, nil
	}
	cfg := *a.opts.Events
	if cfg.Component == "" {
		cfg.Component = "metaconceal-proxy"
	}
	if cfg.Log == nil {
		cfg.Log = a.log
	}
	rec, err := podevents.New(cfg)
	if err != nil {
		return nil, nil, &OptionError{Option: "Events", Err: err}
	}
	a.log.Info("recording Events on pods for concealed and denied requests", "node", cfg.Node, "burst", cfg.Burst, "qps", cfg.QPS)
	return rec, rec.Close, nil
}
