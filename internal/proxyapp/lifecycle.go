package proxyapp

// The lifecycle of one Run: opening every listener, shutting down without a window.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/altsrelay"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/pkg/reuseport"
)

// listeners are the open sockets of one Run, each tracked by readiness.
type listeners struct {
	proxy, alts []net.Listener
	attested    []attestedListener
	admin       []net.Listener // MetricsListen and the probe socket, when set
}

// attestedListener is one open listener of App.attested.
type attestedListener struct {
	hostguard.AttestedListener
	ln net.Listener
}

func (l *listeners) close() {
	for _, ln := range append(append(l.proxy, l.alts...), l.admin...) {
		ln.Close()
	}
	for _, al := range l.attested {
		al.ln.Close()
	}
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
		lns.proxy = append(lns.proxy, a.ready.Track("proxy "+addr.String(), ln))
	}
	for _, addr := range o.ALTS.Listen {
		ln, err := proxy.Listen(ctx, addr.String())
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "ALTS.Listen", Err: err}
		}
		lns.alts = append(lns.alts, a.ready.Track("alts "+addr.String(), ln))
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
		ln = a.ready.Track(fmt.Sprintf("%s %s", al.Ingress, al.Addr), ln)
		lns.attested = append(lns.attested, attestedListener{AttestedListener: al, ln: ln})
	}
	if o.MetricsListen != "" {
		ln, err := proxy.Listen(ctx, o.MetricsListen)
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "MetricsListen", Err: err}
		}
		lns.admin = append(lns.admin, a.ready.Track("metrics "+o.MetricsListen, ln))
	}
	if o.ProbeSocket != "" {
		ln, err := listenProbeSocket(ctx, o.ProbeSocket)
		if err != nil {
			lns.close()
			return nil, &OptionError{Option: "ProbeSocket", Err: err}
		}
		lns.admin = append(lns.admin, a.ready.Track("probe "+o.ProbeSocket, ln))
	}
	return lns, nil
}

// shutdown stops serving, within one ShutdownGrace: the pods' listeners close first,
// the handler's Drain hands held long polls back, connections just accepted get to
// send their first request, then net/http's Shutdown answers what is in flight with
// "Connection: close" and closes idle keep-alive connections, concurrently with the
// relay's; then the metrics server. Requests still open after the grace are cut.
func (a *App) shutdown(handler *proxy.Handler, srv, admin *http.Server, proxyListeners []net.Listener, fresh *atomic.Int64) {
	log := a.log
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), a.opts.ShutdownGrace)
	defer cancel()
	relayDone := make(chan error, 1)
	if a.relay != nil {
		// The relay drains within the same grace as the HTTP side, concurrently.
		go func() { relayDone <- a.relay.Shutdown(ctx) }()
	} else {
		relayDone <- nil
	}
	// Shutdown closes the listeners at once, then waits for the requests in flight;
	// once the listeners are closed, held long polls are handed back (Drain returns
	// when their answers are written: the process must not exit before), and once
	// more after Shutdown, for polls parked meanwhile on keep-alive connections.
	// net/http drops, unanswered, a request it finishes reading after Shutdown began
	// (a connection accepted just before). So the pods' listeners are closed first,
	// and Shutdown waits until every connection accepted has had its first request
	// read (at most freshWait); those requests are answered as usual.
	for _, ln := range proxyListeners {
		ln.Close()
	}
	handler.Drain()
	for wait := time.Now().Add(freshWait); fresh.Load() > 0 && time.Now().Before(wait); {
		time.Sleep(5 * time.Millisecond)
	}
	err := srv.Shutdown(ctx)
	if errors.Is(err, net.ErrClosed) {
		err = nil // a listener closed above, again: every connection was done
	}
	handler.Drain()
	if err == nil && !handler.Settle(settleWait) {
		log.Warn("long polls handed back but not all answered yet", "waited", settleWait.String())
	}
	if err != nil {
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
	log.Info("drained: listeners closed, open requests answered", "took", time.Since(start).String())
	if admin != nil {
		if err := admin.Shutdown(ctx); err != nil {
			log.Warn("metrics listener did not shut down cleanly", "err", err)
		}
	}
}

// settleWait bounds how long shutdown waits, after net/http's Shutdown, for the long
// polls Drain handed back to be answered (they are on hijacked connections).
const settleWait = 5 * time.Second

// freshWait bounds how long shutdown waits for accepted connections to send their first
// request before net/http's Shutdown (a client that sends nothing is closed by it).
const freshWait = time.Second

// countFresh counts srv's connections accepted and not yet past their first request
// (StateNew), through its ConnState hook.
func (a *App) countFresh(srv *http.Server) *atomic.Int64 {
	var n atomic.Int64
	next := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			n.Add(1)
		case http.StateActive, http.StateHijacked, http.StateClosed:
			if c != nil {
				if _, counted := a.freshSeen.LoadAndDelete(c); counted {
					n.Add(-1)
				}
			}
		}
		if st == http.StateNew && c != nil {
			a.freshSeen.Store(c, struct{}{})
		}
		if next != nil {
			next(c, st)
		}
	}
	return &n
}

// setMigrateReq sets net.ipv4.tcp_migrate_req=1 in the node's netns when asked to:
// connections still queued on this instance's listeners when it closes them then go to
// the next instance's instead of being reset. Failing to is logged, not fatal (an old
// kernel, a read-only /proc/sys): the listeners still overlap.
func (a *App) setMigrateReq() {
	if a.opts.ProcSys == "" {
		a.log.Info("net.ipv4.tcp_migrate_req left as it is (--tcp-migrate-req=false)")
		return
	}
	changed, err := reuseport.MigrateReq(a.opts.ProcSys)
	switch {
	case err != nil:
		a.log.Warn("could not set net.ipv4.tcp_migrate_req=1: connections queued on a closing listener are reset in a rolling update", "err", err)
	case changed:
		a.log.Info("set net.ipv4.tcp_migrate_req=1 in the node's network namespace", "proc_sys", a.opts.ProcSys)
	default:
		a.log.Info("net.ipv4.tcp_migrate_req is already 1")
	}
}
