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
		a.guard, err = hostguard.New(cfg, hostguard.Options{Interval: o.Guard.Reconcile, Log: a.log, Registerer: a.metrics.Registry})
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

// listeners are the open sockets of one Run.
type listeners struct {
	proxy, alts []net.Listener
	attested    []attestedListener
	admin       net.Listener // nil without MetricsListen
}

// attestedListener is one open listener of App.attested.
type attestedListener struct {
	hostguard.AttestedListener
	ln net.Listener
}

func (l *listeners) close() {
	for _, ln := range append(l.proxy, l.alts...) {
		ln.Close()
	}
	for _, al := range l.attested {
		al.ln.Close()
	}
	if l.admin != nil {
		l.admin.Close()
	}
}

// Run serves until ctx is done or a listener fails, then shuts down: the metrics
// server first, then the proxy's and the relay's connections drain together within
// ShutdownGrace (held long polls are answered 503 when the grace ends), then the
// guard's reconciliation stops. The host guard is never removed: a restart opens no
// window (`metaconceal-proxy remove-host-guard` takes it away). Run returns nil after
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
	if a.guard != nil {
		// Installed after every option was validated and before listening: it also
		// puts the listen addresses on lo.
		if err := a.guard.Install(ctx); err != nil {
			return fmt.Errorf("install host guard: %w", err)
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
	}
	lns, err := a.listen(ctx)
	if err != nil {
		stopLoops()
		_ = g.Wait()
		return err
	}

	srv := proxy.NewServer(handler, log)
	for _, ln := range lns.proxy {
		g.Go(func() error { return served(srv.Serve(handler.Listener(ln))) }) // unattributed; per-pod connection caps
	}
	for _, ln := range lns.alts {
		g.Go(func() error { return served(a.relay.Serve(ln)) })
	}
	for _, al := range lns.attested {
		if al.Relay {
			g.Go(func() error { return served(a.relay.ServeIngress(al.ln, al.Ingress)) })
		} else {
			g.Go(func() error { return served(srv.Serve(handler.ListenerFor(al.ln, al.Ingress))) })
		}
	}
	var admin *http.Server
	if lns.admin != nil {
		admin = proxy.NewAdminServer(handler, log)
		g.Go(func() error { return served(admin.Serve(lns.admin)) })
	}
	log.Info("metaconceal-proxy serving", "listen", o.Listen, "upstream", o.Upstream.Redacted(),
		"alts_listen", o.ALTS.Listen, "metrics", o.MetricsListen, "recursive", o.Policy.Recursive.String(), "host_guard", a.guard != nil)

	<-serving.Done()
	if ctx.Err() != nil {
		log.Info("shutting down", "grace", o.ShutdownGrace.String())
	} else {
		log.Error("listener failed", "err", context.Cause(serving))
	}
	a.shutdown(handler, srv, admin)
	stopLoops()
	return g.Wait()
}

// served is a Serve's error, nil when it ended because of a shutdown.
func served(err error) error {
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, altsrelay.ErrClosed) {
		return nil
	}
	return err
}

// listen opens every listener, or none.
func (a *App) listen(ctx context.Context) (*listeners, error) {
	o := a.opts
	lns := &listeners{}
	for _, addr := range o.Listen {
		ln, err := proxy.Listen(ctx, addr.String())
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "Listen", Err: err}
		}
		lns.proxy = append(lns.proxy, ln)
	}
	for _, addr := range o.ALTS.Listen {
		ln, err := proxy.Listen(ctx, addr.String())
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "ALTS.Listen", Err: err}
		}
		lns.alts = append(lns.alts, ln)
	}
	for _, al := range a.attested {
		if al.Relay && a.relay == nil {
			continue
		}
		ln, err := proxy.Listen(ctx, al.Addr.String())
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "Guard.Config", Err: fmt.Errorf("%s listener: %w", al.Ingress, err)}
		}
		lns.attested = append(lns.attested, attestedListener{AttestedListener: al, ln: ln})
	}
	if o.MetricsListen != "" {
		ln, err := proxy.Listen(ctx, o.MetricsListen)
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "MetricsListen", Err: err}
		}
		lns.admin = ln
	}
	return lns, nil
}

// shutdown stops serving: the metrics server, then the proxy's server and the relay
// concurrently within one grace; requests still open after it are cut.
func (a *App) shutdown(handler *proxy.Handler, srv, admin *http.Server) {
	log := a.log
	ctx, cancel := context.WithTimeout(context.Background(), a.opts.ShutdownGrace)
	defer cancel()
	if admin != nil {
		if err := admin.Shutdown(ctx); err != nil {
			log.Warn("metrics listener did not shut down cleanly", "err", err)
		}
	}
	relayDone := make(chan error, 1)
	if a.relay != nil {
		// The relay drains within the same grace as the HTTP side, concurrently.
		go func() { relayDone <- a.relay.Shutdown(ctx) }()
	} else {
		relayDone <- nil
	}
	if err := srv.Shutdown(ctx); err != nil {
		// Requests still open after the grace period: close them; clients retry.
		log.Warn("open requests cut after the shutdown grace", "err", err)
		handler.Close()
		if err := srv.Close(); err != nil {
			log.Warn("closing listeners", "err", err)
		}
	}
	if err := <-relayDone; err != nil {
		log.Warn("ALTS connections cut after the shutdown grace", "err", err)
	}
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
