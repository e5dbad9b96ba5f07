package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/metaconceal/metaconceal/internal/flight"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// PodLookup maps a source IP to its pod; *podindex.Index implements it.
type PodLookup interface {
	Lookup(ip netip.Addr) (podindex.Pod, bool)
}

// Defaults for Config fields left zero.
const (
	DefaultUpstreamTimeout = 15 * time.Second
	DefaultLongPollSlack   = 15 * time.Second
	// DefaultMaxConnsPerHost sizes the upstream idle pool: every concurrent client
	// request keeps its own upstream connection instead of dialing a new one.
	DefaultMaxIdleConnsPerHost = 1024
	// maxListingBytes bounds a recursive listing read for filtering, and a coalesced
	// long poll answer held in memory for all its waiters.
	maxListingBytes = 8 << 20
)

// Config wires a Handler.
type Config struct {
	// Upstream is the metadata server, scheme and host only (http://169.254.169.254).
	Upstream *url.URL
	Policy   *policy.Policy
	// Pods names the pod behind a source IP in the audit log; nil logs IPs only.
	Pods PodLookup
	// Notify, when set, is told of each concealed or denied request (Events on pods).
	Notify  BlockNotifier
	Log     *slog.Logger
	Metrics *Metrics
	// Transport carries long polls and readiness checks; defaults to NewTransport().
	Transport http.RoundTripper
	// Ordinary, when set, carries the ordinary requests (not long polls) instead of
	// the proxy's own keep-alive pool, which answers 1.6x what net/http's Transport
	// does on this path with the cache off (docs/figures.md).
	Ordinary http.RoundTripper
	// UpstreamTimeout bounds a request that is not a long poll.
	UpstreamTimeout time.Duration
	// LongPollSlack is added to a long poll's timeout_sec (or to the 3600 s maximum
	// when it has none) before the proxy gives up on the upstream.
	LongPollSlack time.Duration
	// Limits are the per-pod and global limits; the zero value turns them all off.
	Limits Limits
	// Cache configures the answer cache and the coalescing of identical GETs
	// (cache.go); the zero value caches with the defaults.
	Cache CacheConfig
}

// ValidateUpstream checks an upstream URL: http or https, a host, nothing else.
func ValidateUpstream(u *url.URL) error {
	if u == nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return errors.New("proxy: upstream must be an http:// or https:// URL with a host")
	}
	if p := u.Path; (p != "" && p != "/") || u.RawQuery != "" || u.User != nil {
		return fmt.Errorf("proxy: upstream %q must be scheme and host only: the policy decides paths", u.Redacted())
	}
	return nil
}

// Handler is the proxy's http.Handler: the stages of the package doc, in order.
type Handler struct {
	pods    PodLookup
	limits  Limits
	clients *clients // per-pod state: connections, polls, request and audit rates
	conns   sync.Map // net.Conn -> *connInfo, until the connection closes or is hijacked
	metrics *Metrics
	log     *slog.Logger

	unattributed unattributedLog // counted and logged, rate-limited (identity.go)

	admission admission
	decision  decider
	*answerer
	respond *responder
	audit   *auditor

	baseCtx    context.Context // parent of every coalesced upstream request
	cancelBase context.CancelFunc
}

// NewTransport returns the upstream transport: keep-alive connections pooled per
// host with room for the proxy's concurrency, no environment proxy (the metadata
// server is always reached directly), no compression (answers are small, and
// transparent gunzip would cost more than it saves on a local link).
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:          0,
		MaxIdleConnsPerHost:   DefaultMaxIdleConnsPerHost,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		ForceAttemptHTTP2:     false,
		ExpectContinueTimeout: 0,
	}
}

// New validates cfg and returns a Handler.
func New(cfg Config) (*Handler, error) {
	if err := ValidateUpstream(cfg.Upstream); err != nil {
		return nil, err
	}
	if cfg.Policy == nil {
		return nil, errors.New("proxy: no policy")
	}
	if err := cfg.Limits.Validate(); err != nil {
		return nil, err
	}
	h := &Handler{pods: cfg.Pods, limits: cfg.Limits, log: cfg.Log, metrics: cfg.Metrics}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	if h.metrics == nil {
		h.metrics = NewMetrics()
	}
	a := &answerer{
		upstreamScheme:  cfg.Upstream.Scheme,
		upstreamHost:    cfg.Upstream.Host,
		policy:          cfg.Policy,
		transport:       cfg.Transport,
		upstreamTimeout: cfg.UpstreamTimeout,
		longPollSlack:   cfg.LongPollSlack,
		podMaxLongPolls: cfg.Limits.PodMaxLongPolls,
		metrics:         h.metrics,
	}
	if a.transport == nil {
		a.transport = NewTransport()
	}
	if cfg.Ordinary != nil {
		a.upstream = roundTripper{rt: cfg.Ordinary, upstreamScheme: cfg.Upstream.Scheme, host: cfg.Upstream.Host}
	} else {
		a.upstream = newConnPool(cfg.Upstream, DefaultMaxIdleConnsPerHost)
	}
	if a.upstreamTimeout <= 0 {
		a.upstreamTimeout = DefaultUpstreamTimeout
	}
	if a.longPollSlack <= 0 {
		a.longPollSlack = DefaultLongPollSlack
	}
	cache, err := newAnswerCache(cfg.Cache, h.metrics)
	if err != nil {
		return nil, err
	}
	a.cache = cache
	h.baseCtx, h.cancelBase = context.WithCancel(context.Background())
	a.closing = h.baseCtx
	a.drainCtx, a.drainAll = context.WithCancel(h.baseCtx)
	h.clients = newClients(cfg.Limits, h.metrics, h.log)
	h.respond = &responder{metrics: h.metrics, log: h.log, closing: h.baseCtx, releaseConn: h.releaseConn}
	h.audit = &auditor{clients: h.clients, metrics: h.metrics, log: h.log, notify: cfg.Notify}
	h.admission = admission{limits: cfg.Limits, clients: h.clients, metrics: h.metrics, respond: h.respond, audit: h.audit}
	h.decision = newDecider(cfg.Policy, h.metrics, h.audit)
	a.respond, a.clients, a.releaseConn = h.respond, h.clients, h.releaseConn
	a.slots = newSlots(cfg.Limits.MaxUpstreamConns)
	a.upShare = newFairCap(cfg.Limits.MaxUpstreamConns, true)
	// A new GET flight is one more upstream request: charged to the upstream share.
	a.gets = flight.New[reqKey, podKey, reply, *parkedPoll](flight.Config[podKey]{Base: h.baseCtx, Cap: capOf(a.upShare)})
	a.polls = flight.New[reqKey, podKey, reply, *parkedPoll](flight.Config[podKey]{Base: a.drainCtx,
		Cap: capOf(newFairCap(cfg.Limits.MaxUpstreamLongPolls, false)), Parking: true})
	h.answerer = a
	go h.clients.sweeper(h.baseCtx)
	h.log.Info("policy in effect", "patterns", cfg.Policy.Effective())
	h.log.Info("limits in effect (0 = off)", "pod_rate", h.limits.PodRate, "pod_burst", h.limits.PodBurst,
		"pod_max_conns", h.limits.PodMaxConns, "pod_max_long_polls", h.limits.PodMaxLongPolls,
		"max_upstream_long_polls", h.limits.MaxUpstreamLongPolls, "max_upstream_conns", h.limits.MaxUpstreamConns)
	return h, nil
}

// capOf is c as a flight group's cap; nil (no cap) when c is nil.
func capOf(c *fairCap) flight.Cap[podKey] {
	if c == nil {
		return nil
	}
	return flightCap{c}
}

// Drain prepares a zero-gap handover (an upgrade's old instance): from the call on,
// every long poll held and every new one is answered at once as if its timeout_sec
// had elapsed, with the current value and its ETag (200, an answer the client polls
// again from, never an error), so that http.Server.Shutdown finishes promptly.
// Ordinary requests are served as before. Drain does not wait; Close still ends
// what is left.
func (h *Handler) Drain() {
	if h.draining.CompareAndSwap(false, true) {
		h.log.Info("draining: long polls are answered with the current value from now on")
		h.drainAll()
	}
}

// Settle refuses new long polls from now on and waits up to d for every one held to
// be answered (after Drain: handed back); it reports whether they all were. Parked
// polls live on hijacked connections, which http.Server.Shutdown does not wait for:
// a process that exits without Settle can cut the answers Drain started.
func (h *Handler) Settle(d time.Duration) bool {
	h.polls.Stop()
	return h.polls.Wait(d)
}

// Close cancels every upstream long poll still open, answers their clients 503
// (shutting down, retry), waits up to 5 s for those answers to be written, and closes
// idle upstream connections.
func (h *Handler) Close() {
	h.polls.Stop()
	h.cancelBase()
	h.closeIdle()
	if !h.polls.Wait(5 * time.Second) {
		h.log.Warn("long poll answers still being written at shutdown")
	}
}

// ServeHTTP runs one request through the stages: identify, admit, decide, then
// respond (concealed, denied) or answer (allowed).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	x := exchange{w: w, r: r}
	if ci, _ := r.Context().Value(connInfoKey{}).(*connInfo); ci != nil {
		x.conn, x.cl, x.src = ci, ci.client, ci.src
	} else {
		// Served without NewServer's hooks (tests, a recorder): identify per request.
		x.src = h.identify(r.RemoteAddr)
		x.cl = h.clients.acquire(x.src)
		defer h.clients.release(x.cl)
	}
	// Writing the answer has a deadline: a client that does not read it loses its
	// connection instead of pinning it. A held long poll replaces it with its own.
	if wd, ok := w.(writeDeadliner); ok {
		_ = wd.SetWriteDeadline(time.Now().Add(h.upstreamTimeout + writeGrace))
	}
	// The client's Host is never forwarded: every path upstream names the upstream's
	// own host, so Host is not a free key that makes identical polls distinct.
	r.Host = h.upstreamHost

	if !h.admission.admit(&x) {
		return
	}
	if serveSelftest(w, r) { // the node agent's datapath self-test: selftest.go
		return
	}
	h.decision.decide(&x)
	h.countUnattributed(x.src, x.d.Path)
	if x.d.Verdict != policy.Allow {
		h.respond.blocked(&x)
		h.audit.blocked(&x)
		return
	}
	h.answer(&x)
}

// Ready checks that the upstream answers its discovery root.
func (h *Handler) Ready(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.upstreamScheme+"://"+h.upstreamHost+"/", nil)
	if err != nil {
		return fmt.Errorf("readiness request: %w", err)
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := h.transport.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("metadata server %s: %w", h.upstreamHost, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("metadata server %s answered %s to GET /", h.upstreamHost, resp.Status)
	}
	return nil
}
