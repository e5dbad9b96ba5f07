package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// One pod cannot starve another: every limit below is kept per client (the pod the
// kernel attested, identity.go; one shared client for every unattributed connection),
// so a pod's share does not depend on what other pods do, and the global caps on what
// goes upstream are sized so that every pod at its own cap still fits and are shared
// fairly when they fill (fairCap, at the end of this file).
//
// A client is identified once per connection (http.Server.ConnContext), so the pod
// index is consulted per connection, not per request.

// Limits caps what one client can take from the proxy and what all clients together
// can take upstream. Zero turns a limit off (the zero value: no limits at all).
type Limits struct {
	// PodRate is the sustained request rate per pod (requests per second) and
	// PodBurst the bucket size: a pod may send PodBurst requests at once, then
	// PodRate per second. Over it: 429 with Retry-After.
	PodRate  float64
	PodBurst int
	// PodMaxConns caps a pod's open connections (held long polls included); the
	// request on a connection over the cap is answered 429 and the connection closed.
	PodMaxConns int
	// PodMaxLongPolls caps a pod's held long polls (wait_for_change=true).
	PodMaxLongPolls int
	// MaxUpstreamLongPolls caps the distinct long polls open upstream (identical
	// polls share one); a new one over it is answered 503 with Retry-After.
	MaxUpstreamLongPolls int
	// MaxUpstreamConns caps the ordinary requests in flight upstream at once; a
	// request waits for a slot until its deadline, then 503.
	MaxUpstreamConns int
}

// DefaultLimits are metaconceal-proxy's defaults; docs/proxy.md explains the sizing.
// In short: a pod's start-up burst of 100 requests within a second is never refused
// (burst 200, then 100/s), and with 110 pods on a node (GKE's default maximum) each
// at every cap, the proxy holds 110 x 64 client connections plus 1,024 + 512 upstream
// ones: about 8,600 descriptors of the 20,000 allowed and, at the measured cost per
// connection, well inside the DaemonSet's 384 MiB.
var DefaultLimits = Limits{
	PodRate:              100,
	PodBurst:             200,
	PodMaxConns:          64,
	PodMaxLongPolls:      32,
	MaxUpstreamLongPolls: 1024,
	MaxUpstreamConns:     512,
}

// Refusal reasons, the metric's label values.
const (
	reasonRate              = "pod_rate"
	reasonPodConns          = "pod_conns"
	reasonPodLongPolls      = "pod_long_polls"
	reasonUpstreamLongPolls = "upstream_long_polls"
	reasonUpstreamConns     = "upstream_conns"
	// Over the pod's fair share of a node-wide cap (fairCap): 429.
	reasonShareLongPolls = "share_upstream_long_polls"
	reasonShareConns     = "share_upstream_conns"
)

var refusalReasons = []string{reasonRate, reasonPodConns, reasonPodLongPolls, reasonUpstreamLongPolls, reasonUpstreamConns,
	reasonShareLongPolls, reasonShareConns}

// Audit lines: at most auditRate per second per client after a burst of auditBurst;
// the rest are counted and summarised.
const (
	auditRate  = 5
	auditBurst = 20
	// maxClients bounds the table of clients; identities beyond it share one entry.
	maxClients = 1 << 16
	// sweepEvery is how often idle clients are forgotten and audit drops summarised.
	sweepEvery = 10 * time.Second
)

// podKey names one pod for every per-pod budget: the limits here, the fair shares of
// the node-wide caps (fairCap) and the entries it may add to the cache. podKeyOf
// (identity.go) builds it: the attested pod, or the one key every unattributed
// connection shares.
type podKey struct {
	namespace, name string
}

// client is what the proxy keeps per pod (or source IP).
type client struct {
	key podKey
	src source // the pod and one of its IPs, for the audit log
	ns  string // metric label: the pod's namespace, "unknown" without a record

	conns     atomic.Int32
	longPolls atomic.Int32
	// refused counts this client's refusals by reason, resolved once: a flooding pod
	// is refused thousands of times a second.
	refused map[string]prometheus.Counter

	mu           sync.Mutex
	tokens       float64
	last         time.Time
	auditTokens  float64
	auditLast    time.Time
	auditDropped int64 // since the last summary
	// Polite refusals of connections over the cap (a 429 written) this second; past
	// connRefusalsPerSecond the pod's further connections are reset instead.
	connRefusals     int
	connRefusalsFrom time.Time

	refs int // connections, polls and requests using it; guarded by clients.mu
}

// clients is the table of clients.
type clients struct {
	limits  Limits
	metrics *Metrics
	log     *slog.Logger

	mu       sync.Mutex
	byKey    map[podKey]*client
	overflow *client
}

func newClients(l Limits, m *Metrics, log *slog.Logger) *clients {
	return &clients{limits: l, metrics: m, log: log, byKey: make(map[podKey]*client)}
}

// acquire returns the client for src with a reference the caller gives back with
// release.
func (cs *clients) acquire(src source) *client {
	key := podKeyOf(src)
	cs.mu.Lock()
	defer cs.mu.Unlock()
	c := cs.byKey[key]
	if c == nil {
		if len(cs.byKey) >= maxClients {
			if cs.overflow == nil {
				cs.overflow = cs.newClient(podKey{namespace: "overflow"}, source{ip: "overflow"})
			}
			c = cs.overflow
		} else {
			c = cs.newClient(key, src)
			cs.byKey[key] = c
		}
	}
	c.refs++
	return c
}

func (cs *clients) newClient(key podKey, src source) *client {
	ns := nsLabel(src)
	now := time.Now()
	c := &client{key: key, src: src, ns: ns, tokens: float64(cs.limits.PodBurst), last: now,
		auditTokens: auditBurst, auditLast: now, refused: make(map[string]prometheus.Counter, len(refusalReasons))}
	for _, r := range refusalReasons {
		c.refused[r] = cs.metrics.refused.WithLabelValues(ns, r)
	}
	return c
}

func (cs *clients) release(c *client) {
	cs.mu.Lock()
	c.refs--
	cs.mu.Unlock()
}

func (cs *clients) hold(c *client) {
	cs.mu.Lock()
	c.refs++
	cs.mu.Unlock()
}

// allow takes one request token. When the bucket is empty it returns false and the
// whole seconds until a token is back (for Retry-After).
func (cs *clients) allow(c *client, now time.Time) (bool, int) {
	rate, burst := cs.limits.PodRate, float64(cs.limits.PodBurst)
	if rate <= 0 {
		return true, 0
	}
	if burst < 1 {
		burst = 1
	}
	c.mu.Lock()
	c.tokens = math.Min(burst, c.tokens+now.Sub(c.last).Seconds()*rate)
	c.last = now
	if c.tokens >= 1 {
		c.tokens--
		c.mu.Unlock()
		return true, 0
	}
	wait := (1 - c.tokens) / rate
	c.mu.Unlock()
	return false, max(1, int(math.Ceil(wait)))
}

// allowAudit takes one audit-line token; a line refused is counted as dropped. The
// first line allowed after drops reports how many there were.
func (cs *clients) allowAudit(c *client, now time.Time) (ok bool, droppedBefore int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.auditTokens = math.Min(auditBurst, c.auditTokens+now.Sub(c.auditLast).Seconds()*auditRate)
	c.auditLast = now
	if c.auditTokens < 1 {
		c.auditDropped++
		cs.metrics.auditDropped.WithLabelValues(c.ns).Inc()
		return false, 0
	}
	c.auditTokens--
	droppedBefore, c.auditDropped = c.auditDropped, 0
	return true, droppedBefore
}

// connRefusalsPerSecond bounds the 429s written per pod per second to connections
// over its cap; a pod that keeps opening connections past them is reset.
const connRefusalsPerSecond = 20

// allowConnRefusal reports whether a connection over c's cap may still be told 429
// (true) or is reset (false).
func (cs *clients) allowConnRefusal(c *client, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.connRefusalsFrom) >= time.Second {
		c.connRefusalsFrom, c.connRefusals = now, 0
	}
	c.connRefusals++
	return c.connRefusals <= connRefusalsPerSecond
}

// sweep summarises audit drops not yet reported and forgets clients that hold
// nothing and whose buckets are full again (forgetting them changes nothing).
func (cs *clients) sweep(now time.Time) {
	type summary struct {
		c       *client
		dropped int64
	}
	var sums []summary
	cs.mu.Lock()
	for key, c := range cs.byKey {
		c.mu.Lock()
		if c.auditDropped > 0 {
			sums = append(sums, summary{c, c.auditDropped})
			c.auditDropped = 0
		}
		full := cs.limits.PodRate <= 0 ||
			c.tokens+now.Sub(c.last).Seconds()*cs.limits.PodRate >= float64(cs.limits.PodBurst)
		auditFull := c.auditTokens+now.Sub(c.auditLast).Seconds()*auditRate >= auditBurst
		c.mu.Unlock()
		if c.refs == 0 && full && auditFull {
			delete(cs.byKey, key)
		}
	}
	cs.mu.Unlock()
	for _, s := range sums {
		cs.log.LogAttrs(context.Background(), slog.LevelWarn, "audit lines dropped: this pod exceeded its audit rate",
			slog.Int64("dropped", s.dropped),
			slog.String("pod_namespace", s.c.src.pod.Namespace),
			slog.String("pod_name", s.c.src.pod.Name),
			slog.String("source_ip", s.c.src.ip),
			slog.Int("audit_rate_per_second", auditRate))
	}
}

// sweeper runs sweep until ctx ends.
func (cs *clients) sweeper(ctx context.Context) {
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			cs.sweep(time.Now())
			return
		case now := <-t.C:
			cs.sweep(now)
		}
	}
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
	if tc, ok := c.(*trackedConn); ok {
		return context.WithValue(ctx, connInfoKey{}, tc.ci) // counted by the Listener
	}
	src := h.identify(c.RemoteAddr().String())
	cl := h.clients.acquire(src)
	n := cl.conns.Add(1)
	h.metrics.clientConns.Inc()
	ci := &connInfo{client: cl, src: src, over: h.limits.PodMaxConns > 0 && int(n) > h.limits.PodMaxConns}
	h.conns.Store(c, ci)
	return context.WithValue(ctx, connInfoKey{}, ci)
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

// refuse answers a request the limits do not let through: 429 for a pod's own
// limits, 503 for the global ones, always with Retry-After.
func (h *Handler) refuse(w http.ResponseWriter, c *client, reason string, retryAfter int, closeConn bool) {
	c.refused[reason].Inc()
	status := http.StatusTooManyRequests
	body := "metaconceal: too many requests from this pod (" + reason + "); retry after " + strconv.Itoa(retryAfter) + " s.\n"
	if reason == reasonUpstreamLongPolls || reason == reasonUpstreamConns {
		status = http.StatusServiceUnavailable
		body = "metaconceal: the node's metadata proxy is at its upstream limit (" + reason + "); retry after " + strconv.Itoa(retryAfter) + " s.\n"
	}
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Retry-After"] = []string{strconv.Itoa(retryAfter)}
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	if closeConn {
		hdr["Connection"] = []string{"close"}
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

// writeGrace bounds writing one ordinary answer: a client that does not read it
// in time loses its connection instead of pinning it.
const writeGrace = 10 * time.Second

type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

// refuseBody answers a request that announces a body at once, without reading the
// body, and closes the connection: GET and HEAD carry none, and a body announced but
// never sent would otherwise hold the connection until a read deadline.
func (h *Handler) refuseBody(w http.ResponseWriter, r *http.Request, ci *connInfo) {
	body := "Request denied by metaconceal rule request-body: GET and HEAD carry no body.\n"
	hj, ok := w.(http.Hijacker)
	if ok {
		conn, _, err := hj.Hijack()
		if err == nil {
			_ = conn.SetDeadline(time.Now().Add(writeGrace))
			hdr := http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle, "X-Content-Type-Options": hdrNoSniff}
			_, _ = conn.Write(rawResponse(http.StatusForbidden, hdr, []byte(body), false))
			closeWrite(conn)
			// Read what the client may still send (up to 64 KiB, for a second) before
			// closing: closing with unread data resets the connection, and the client
			// could lose the answer.
			go func() {
				_ = conn.SetReadDeadline(time.Now().Add(time.Second))
				_, _ = io.CopyN(io.Discard, conn, 64<<10)
				conn.Close()
				h.releaseConn(ci)
			}()
			return
		}
	}
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Connection"] = []string{"close"}
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(http.StatusForbidden)
	_, _ = io.WriteString(w, body)
}

// validate refuses negative limits.
func (l Limits) validate() error {
	switch {
	case l.PodRate < 0 || math.IsNaN(l.PodRate) || math.IsInf(l.PodRate, 0):
		return fmt.Errorf("proxy: pod rate %v: want a finite number >= 0 (0 turns it off)", l.PodRate)
	case l.PodBurst < 0, l.PodMaxConns < 0, l.PodMaxLongPolls < 0, l.MaxUpstreamLongPolls < 0, l.MaxUpstreamConns < 0:
		return fmt.Errorf("proxy: limits %+v: want numbers >= 0 (0 turns a limit off)", l)
	case l.PodRate > 0 && l.PodBurst == 0:
		return errors.New("proxy: pod rate set with a burst of 0: every request would be refused; give a burst >= 1")
	}
	return nil
}

// clientConnsOpen is the number of client connections counted now (for tests).
func (h *Handler) clientConnsOpen() int {
	h.clients.mu.Lock()
	defer h.clients.mu.Unlock()
	n := 0
	for _, c := range h.clients.byKey {
		n += int(c.conns.Load())
	}
	return n
}

// Listener wraps a listener of the proxy's: each accepted connection is identified
// once and counted against its pod's connection cap. A connection over the cap is
// answered at once, without reading its request or starting a goroutine for it
// (a canned 429 with Retry-After and Connection: close), and closed: a pod opening
// connections as fast as it can costs the proxy an accept, a lookup and one write
// each. Connections are given back when closed, hijacked ones (parked long polls)
// included.
// Its connections are unattributed (the proxy's own port); ListenerFor wraps the
// attested ones (identity.go).
func (h *Handler) Listener(ln net.Listener) net.Listener {
	return h.ListenerFor(ln, podindex.Unattributed)
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

// refusedConnAnswer is written to a connection over its pod's cap.
var refusedConnAnswer = rawResponse(http.StatusTooManyRequests,
	http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle, "Retry-After": {"1"}},
	[]byte("metaconceal: too many connections from this pod ("+reasonPodConns+"); retry after 1 s.\n"), false)

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

// Fair shares of the node-wide caps (--max-upstream-long-polls, --max-upstream-conns).
// A cap is first come, first served only up to a point: no pod holds more than its
// share of it, and the last part of it, the reserve, goes only to pods that hold
// little of it. So a pod (or a few) taking all they can leaves room for the others:
//
//	share   = max(1, cap/capShareDiv)        a pod over it is answered 429
//	reserve = cap/capReserveDiv              the last units of the cap...
//	small   = max(1, reserve/capReserveFor)  ...go only to pods holding fewer than this
//
// With the defaults: long polls (1,024) share 128, reserve 256 for pods holding
// under 8; upstream requests (512) share 64, reserve 128 for pods holding under 4.
// The reserve serves at least capReserveFor pods each taking up to small of it. A
// pod over its share is told 429 at once (its own doing); when the whole cap is
// taken, a long poll is refused 503 and an upstream request waits up to 1 s for a
// slot (the pool's, upstream.go), then 503, as before.
const (
	capShareDiv   = 8
	capReserveDiv = 4
	capReserveFor = 32
)

// fairCap is one node-wide cap shared fairly between pods (see above). A nil
// *fairCap is no cap.
type fairCap struct {
	max, share, reserve, small int
	// queue: the cap itself is enforced elsewhere, with a wait (the upstream pool's
	// slots); a unit is still taken over max, by a pod holding under small, and the
	// request waits there.
	queue bool

	mu   sync.Mutex
	used int
	held map[podKey]int // pods holding at least one unit
}

// newFairCap returns the fair cap for n units; nil (no cap) when n is 0. queue: see
// fairCap.queue.
func newFairCap(n int, queue bool) *fairCap {
	if n <= 0 {
		return nil
	}
	reserve := n / capReserveDiv
	return &fairCap{
		max:     n,
		queue:   queue,
		share:   max(1, n/capShareDiv),
		reserve: reserve,
		small:   max(1, reserve/capReserveFor),
		held:    make(map[podKey]int),
	}
}

// capVerdict is fairCap.take's answer.
type capVerdict uint8

const (
	capTaken     capVerdict = iota
	capOverShare            // the pod holds its share, or the rest is the reserve and it holds more than a little: 429
	capFull                 // every unit is taken (and the cap does not queue): 503
)

// take takes one unit for pod k.
func (c *fairCap) take(k podKey) capVerdict {
	if c == nil {
		return capTaken
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.held[k]
	switch {
	case h >= c.share, c.used >= c.max-c.reserve && h >= c.small:
		return capOverShare
	case c.used >= c.max && !c.queue:
		return capFull
	}
	c.held[k] = h + 1
	c.used++
	return capTaken
}

// give gives back one unit pod k took.
func (c *fairCap) give(k podKey) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.used--
	if h := c.held[k] - 1; h > 0 {
		c.held[k] = h
	} else {
		delete(c.held, k)
	}
}

// takeUpstream takes a unit of pod cl's share of the upstream requests for a request
// sent on its own (not a coalesced GET, whose flight is charged instead), or answers
// 429 and reports false. The caller gives it back with h.upShare.give(cl.key).
func (h *Handler) takeUpstream(w http.ResponseWriter, cl *client) bool {
	if h.upShare.take(cl.key) != capTaken {
		h.refuse(w, cl, reasonShareConns, 1, false)
		return false
	}
	return true
}
