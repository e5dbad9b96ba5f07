package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// Admission, the first stage: a request is let in or answered here. One pod cannot
// starve another: every limit is kept per client (the pod behind the connection, see
// identity.go; the source IP where there is none), so a pod's share does not depend
// on what other pods do, and the node-wide caps on what goes upstream are sized so
// that every pod at its own cap still fits and are shared fairly when they fill
// (faircap.go). Request and audit rates are golang.org/x/time/rate limiters.

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

// Validate refuses negative limits and a rate without a burst.
func (l Limits) Validate() error {
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

// admission is the first stage: request body, connection cap, request rate.
type admission struct {
	limits  Limits
	clients *clients
	metrics *Metrics
	respond *responder
	audit   *auditor
}

// admit lets x in, or answers it (and reports false).
func (a *admission) admit(x *exchange) bool {
	if x.r.ContentLength != 0 || x.r.TransferEncoding != nil {
		x.d = bodyDecision
		a.metrics.countRequest(x.d.Rule)
		a.respond.bodyRefused(x)
		a.audit.blocked(x)
		return false
	}
	if x.conn != nil && x.conn.over {
		a.respond.refused(x, reasonPodConns, 1, true)
		return false
	}
	if ok, retry := x.cl.allow(time.Now()); !ok {
		a.respond.refused(x, reasonRate, retry, true) // re-dialling meets the host guard's SYN limit
		return false
	}
	return true
}

// Audit lines: at most auditRate per second per client after a burst of auditBurst;
// the rest are counted and summarised.
const (
	auditRate  = 5
	auditBurst = 20
	// maxClients bounds the table of clients; identities beyond it share one entry.
	maxClients = 1 << 16
	// sweepEvery is how often idle clients are forgotten and audit drops summarised.
	sweepEvery = 10 * time.Second
	// connRefusalsPerSecond bounds the 429s written per pod per second to connections
	// over its cap; a pod that keeps opening connections past them is reset.
	connRefusalsPerSecond = 20
)

// client is what the proxy keeps per pod (or source IP).
type client struct {
	key podKey
	src source // the pod and one of its IPs, for the audit log
	ns  string // metric label: nsLabel

	conns     atomic.Int32
	longPolls atomic.Int32
	// refused counts this client's refusals by reason, resolved once: a flooding pod
	// is refused thousands of times a second.
	refused map[string]prometheus.Counter

	requests *rate.Limiter // nil: no request rate
	audits   *rate.Limiter

	mu           sync.Mutex
	auditDropped int64 // since the last summary
	// Polite refusals of connections over the cap (a 429 written) this second; past
	// connRefusalsPerSecond the pod's further connections are reset instead.
	connRefusals     int
	connRefusalsFrom time.Time

	refs int // connections, polls and requests using it; guarded by clients.mu
}

// allow takes one request token. When there is none it returns false and the whole
// seconds until one is back (for Retry-After).
func (c *client) allow(now time.Time) (bool, int) {
	if c.requests == nil || c.requests.AllowN(now, 1) {
		return true, 0
	}
	r := c.requests.ReserveN(now, 1)
	if !r.OK() {
		return false, 1
	}
	wait := r.DelayFrom(now)
	r.CancelAt(now) // only asked for the delay
	return false, max(1, int(math.Ceil(wait.Seconds())))
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
	c := &client{key: key, src: src, ns: ns, audits: rate.NewLimiter(auditRate, auditBurst),
		refused: make(map[string]prometheus.Counter, len(refusalReasons))}
	if cs.limits.PodRate > 0 {
		c.requests = rate.NewLimiter(rate.Limit(cs.limits.PodRate), max(1, cs.limits.PodBurst))
	}
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

// allowAudit takes one audit-line token; a line refused is counted as dropped. The
// first line allowed after drops reports how many there were.
func (cs *clients) allowAudit(c *client, now time.Time) (ok bool, droppedBefore int64) {
	allowed := c.audits.AllowN(now, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !allowed {
		c.auditDropped++
		cs.metrics.auditDropped.WithLabelValues(c.ns).Inc()
		return false, 0
	}
	droppedBefore, c.auditDropped = c.auditDropped, 0
	return true, droppedBefore
}

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
// nothing and whose limiters are full again (forgetting them changes nothing).
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
		c.mu.Unlock()
		full := c.requests == nil || c.requests.TokensAt(now) >= float64(c.requests.Burst())
		auditFull := c.audits.TokensAt(now) >= auditBurst
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
