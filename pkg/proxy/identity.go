package proxy

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// Who is asking: every connection is identified once, when accepted (Listener, or
// ConnContext for a server on a listener of its own), and the identity travels with
// each of its requests (connInfo, then the exchange). Everything per pod (limits,
// fair shares, cache charges, audit lines, Events) uses the podKey built here.

// source is who sent a request: its IP and, from the state records, its pod.
type source struct {
	ip   string
	addr netip.Addr
	pod  podindex.Pod // zero when the IP has no state record
}

// podKey names one pod for every per-pod budget: the limits, the fair shares of
// the node-wide caps (fairCap) and the entries it may add to the cache. Today it is
// built from the source address (podKeyOf): the pod its state record names, else the
// IP. Attested identity (issue 17, part 1) changes only how it is built; nothing
// that uses it needs to change.
type podKey struct {
	namespace, name string
	ip              netip.Addr // zero for a pod
}

// podKeyOf is the pod key of a source.
func podKeyOf(src source) podKey {
	if src.pod.Name == "" {
		return podKey{ip: src.addr}
	}
	return podKey{namespace: src.pod.Namespace, name: src.pod.Name}
}

// identify names the client behind a remote address.
func (h *Handler) identify(remote string) source {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return source{ip: remote}
	}
	return h.identifyAddr(ap.Addr())
}

func (h *Handler) identifyAddr(addr netip.Addr) source {
	addr = addr.Unmap()
	s := source{ip: addr.String(), addr: addr}
	if h.pods != nil {
		s.pod, _ = h.pods.Lookup(addr)
	}
	return s
}

// connInfo is what the proxy keeps per client connection.
type connInfo struct {
	client   *client
	src      source // this connection's own source (a pod may have several IPs)
	over     bool   // opened over the pod's connection cap
	released atomic.Bool
}

type connInfoKey struct{}

// ConnContext is the http.Server hook that passes each connection's client to its
// requests. Connections accepted through Listener are already counted; others (a
// server on a listener of its own) are identified and counted here, and a request
// on one over the cap is answered 429 and its connection closed.
func (h *Handler) ConnContext(ctx context.Context, c net.Conn) context.Context {
	if _, ok := c.(*trackedConn); ok {
		return connContext(ctx, c) // counted by the Listener
	}
	src := h.identify(c.RemoteAddr().String())
	cl := h.clients.acquire(src)
	n := cl.conns.Add(1)
	h.metrics.clientConns.Inc()
	ci := &connInfo{client: cl, src: src, over: h.limits.PodMaxConns > 0 && int(n) > h.limits.PodMaxConns}
	h.conns.Store(c, ci)
	return context.WithValue(ctx, connInfoKey{}, ci)
}

// connContext passes the pod of a connection accepted through Handler.Listener to
// its requests, whatever handler serves them (NewServer).
func connContext(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(*trackedConn); ok {
		return context.WithValue(ctx, connInfoKey{}, tc.ci)
	}
	return ctx
}

// ConnState is the http.Server hook that gives back a closed connection. A hijacked
// one (a parked long poll, a refused body) is given back by whoever hijacked it.
func (h *Handler) ConnState(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateClosed:
		if v, ok := h.conns.LoadAndDelete(c); ok {
			h.releaseConn(v.(*connInfo))
		}
	case http.StateHijacked:
		h.conns.Delete(c)
	}
}

func (h *Handler) releaseConn(ci *connInfo) {
	if ci == nil || !ci.released.CompareAndSwap(false, true) {
		return
	}
	ci.client.conns.Add(-1)
	h.metrics.clientConns.Dec()
	h.clients.release(ci.client)
}

// Listener wraps a listener of the proxy's: each accepted connection is identified
// once and counted against its pod's connection cap. A connection over the cap is
// answered at once, without reading its request or starting a goroutine for it
// (a canned 429 with Retry-After and Connection: close), and closed: a pod opening
// connections as fast as it can costs the proxy an accept, a lookup and one write
// each. Connections are given back when closed, hijacked ones (parked long polls)
// included.
func (h *Handler) Listener(ln net.Listener) net.Listener { return &podListener{Listener: ln, h: h} }

type podListener struct {
	net.Listener
	h *Handler
}

// trackedConn is an accepted connection counted against its pod.
type trackedConn struct {
	net.Conn
	ci *connInfo
	h  *Handler
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.h.releaseConn(c.ci)
	return err
}

// CloseWrite sends FIN after an answer (parked long polls, refused bodies).
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// closeWrite sends FIN after an answer written on a raw connection, before it is
// closed, when the connection can (TCP, a trackedConn).
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

func (l *podListener) Accept() (net.Conn, error) {
	h := l.h
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var src source
		if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			src = h.identifyAddr(ta.AddrPort().Addr())
		} else {
			src = h.identify(c.RemoteAddr().String())
		}
		cl := h.clients.acquire(src)
		n := cl.conns.Add(1)
		h.metrics.clientConns.Inc()
		ci := &connInfo{client: cl, src: src}
		if max := h.limits.PodMaxConns; max > 0 && int(n) > max {
			cl.refused[reasonPodConns].Inc()
			if h.clients.allowConnRefusal(cl, time.Now()) {
				_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				_, _ = c.Write(refusedConnAnswer) // a fresh socket's buffer takes it at once
				closeWrite(c)
			} else if tc, ok := c.(*net.TCPConn); ok {
				// Told 429 often enough this second: reset, the cheapest refusal
				// (no write, no FIN exchange, no TIME_WAIT on the proxy's side).
				_ = tc.SetLinger(0)
			}
			c.Close()
			h.releaseConn(ci)
			continue
		}
		return &trackedConn{Conn: c, ci: ci, h: h}, nil
	}
}
