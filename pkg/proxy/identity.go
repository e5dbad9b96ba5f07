package proxy

import (
	"context"
	"log/slog"
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

// Who is asking (issue 17). A connection's identity is decided by the listener that
// accepted it, i.e. by the host guard's rules at connection set-up (pkg/hostguard,
// attest.go), never by a lookup that could grant more than the kernel vouched for:
//
//   - podindex.Unattributed (the proxy's own port; also any connection served without
//     the proxy's Listener): concealed, and every such connection shares one podKey,
//     so forged addresses cannot multiply a budget. Audit lines name no pod and no
//     Event is recorded; the requests are counted
//     (metaconceal_proxy_unattributed_requests_total).
//   - podindex.Attested: the pod the index names for the source IP, which the guard's
//     rule matched on the attachment's host interface; unattributed when the index
//     does not know it (yet, or any more: an accept never waits for a reload).
//   - podindex.Exposed: as Attested, and served in full (mode EXPOSED, excluded
//     namespaces). Exposure is the listener's, never the record's.

// source is who sent a request: its IP and, when the kernel attested it, its pod.
type source struct {
	ip       string
	addr     netip.Addr
	pod      podindex.Pod // zero unless attested
	attested bool         // the kernel vouched for pod (see above)
	exposed  bool         // attested through the exposed listener: served in full
}

// podKey names one pod for every per-pod budget: the limits, the fair shares of
// the node-wide caps (fairCap) and the entries it may add to the cache. podKeyOf
// builds it: the attested pod, or the one key every unattributed connection shares.
type podKey struct {
	namespace, name string
}

// unattributedKey is the one budget of every unattributed connection.
var unattributedKey = podKey{namespace: "unattributed"}

// unattributedLabel is the namespace label of unattributed requests in metrics.
const unattributedLabel = "unattributed"

// podKeyOf is the pod key of a source: its pod when attested, else the one
// unattributed key.
func podKeyOf(src source) podKey {
	if !src.attested {
		return unattributedKey
	}
	return podKey{namespace: src.pod.Namespace, name: src.pod.Name}
}

// nsLabel is the namespace label of a source in metrics.
func nsLabel(src source) string {
	switch {
	case !src.attested:
		return unattributedLabel
	case src.pod.Namespace == "":
		return "unknown"
	}
	return src.pod.Namespace
}

// identifyConn names the client of a connection accepted with ingress in. It reads
// the index's snapshot only: it never waits.
func (h *Handler) identifyConn(addr netip.Addr, in podindex.Ingress) source {
	addr = addr.Unmap()
	s := source{ip: addr.String(), addr: addr}
	if in == podindex.Unattributed || h.pods == nil {
		return s
	}
	pod, ok := h.pods.Lookup(addr)
	if !ok {
		return s
	}
	s.pod, s.attested, s.exposed = pod, true, in == podindex.Exposed
	return s
}

// identify names the client behind a remote address of a connection that came
// through no Listener of the proxy's: nothing attests it.
func (h *Handler) identify(remote string) source {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return source{ip: remote}
	}
	return h.identifyConn(ap.Addr(), podindex.Unattributed)
}

// unattributedLog is what the rate-limited log of unattributed requests keeps.
type unattributedLog struct {
	since  atomic.Int64 // requests since the last line
	logged atomic.Int64 // when the last line was written, in Unix nanoseconds
}

// unattributedLogEvery bounds the log lines about unattributed requests.
const unattributedLogEvery = 10 * time.Second

// countUnattributed counts a request of an unattributed source and logs, at most
// once per unattributedLogEvery, how many there were.
func (h *Handler) countUnattributed(src source, path string) {
	if src.attested {
		return
	}
	h.metrics.unattributed.Inc()
	h.unattributed.since.Add(1)
	now := time.Now().UnixNano()
	last := h.unattributed.logged.Load()
	if now-last < int64(unattributedLogEvery) || !h.unattributed.logged.CompareAndSwap(last, now) {
		return
	}
	h.log.LogAttrs(context.Background(), slog.LevelInfo, "unattributed metadata requests: served as concealed, in one shared budget",
		slog.Int64("requests_since_last_line", h.unattributed.since.Swap(0)),
		slog.String("last_source_ip", src.ip),
		slog.String("last_path", clip(path, maxAuditField)))
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
// Its connections are unattributed (the proxy's own port); ListenerFor wraps the
// attested ones.
func (h *Handler) Listener(ln net.Listener) net.Listener {
	return h.ListenerFor(ln, podindex.Unattributed)
}

// ListenerFor wraps a listener of the proxy's whose connections all have ingress in
// (see Listener for the connection cap).
func (h *Handler) ListenerFor(ln net.Listener, in podindex.Ingress) net.Listener {
	return &podListener{Listener: ln, h: h, in: in}
}

type podListener struct {
	net.Listener
	h  *Handler
	in podindex.Ingress // what the guard's rules say about every connection here
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
			src = h.identifyConn(ta.AddrPort().Addr(), l.in)
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
