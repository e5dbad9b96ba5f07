// Package proxy is the HTTP side of metaconceal-proxy: it asks pkg/policy about each
// request, answers concealed and denied requests itself (and audits them), and sends
// allowed ones upstream in their canonical form only.
//
// Where things are:
//
//	proxy.go       Handler: per-request flow, audit, forwarding, error answers
//	limits.go      per-pod limits, fair shares of the node-wide caps, connection accounting
//	upstream.go    the lean keep-alive pool ordinary requests use (no http.Transport)
//	cache.go       the answer cache (what it keeps: cachetable.go; metrics: cachestats.go)
//	flight.go      coalescing: identical requests share one upstream request (a flight)
//	coalesce.go    ordinary GETs through flights
//	longpoll.go    long polls (wait_for_change=true) through flights, parked connections
//	listing.go     filtered recursive listings, which fail closed
//	metrics.go     the Prometheus series
//	server.go      http.Server settings, admin endpoints, listeners
package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// PodLookup maps a source IP to its pod; *podindex.Index implements it.
type PodLookup interface {
	Lookup(ip netip.Addr) (podindex.Pod, bool)
}

// BlockNotifier hears of every concealed or denied request, after its audit line, with
// the pod behind it (zero when the source IP has no state record). It must not block:
// *podevents.Recorder queues a rate-limited Event on the pod.
type BlockNotifier interface {
	Blocked(pod podindex.Pod, d policy.Decision)
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
	// Ordinary requests use the proxy's own lean connection pool.
	Transport http.RoundTripper
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

// Handler is the proxy's http.Handler.
type Handler struct {
	upstreamScheme, upstreamHost string
	policy                       *policy.Policy
	exposedPolicy                *policy.Policy // for pods the plugin left unconcealed
	pods                         PodLookup
	notify                       BlockNotifier
	unattributed                 unattributedLog // counted and logged, rate-limited (identity.go)
	log                          *slog.Logger
	metrics                      *Metrics
	transport                    http.RoundTripper
	upstreamTimeout              time.Duration
	longPollSlack                time.Duration

	pool       *connPool // ordinary requests
	limits     Limits
	clients    *clients        // per-pod state: connections, polls, request and audit rates
	conns      sync.Map        // net.Conn -> *connInfo, until the connection closes or is hijacked
	cache      *answerCache    // cached answers (cache.go)
	gets       *flightGroup    // ordinary GETs in flight, coalesced (coalesce.go)
	polls      *flightGroup    // long polls in flight, coalesced (longpoll.go)
	upShare    *fairCap        // pods' fair shares of --max-upstream-conns (limits.go)
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
	if cfg.Upstream == nil || cfg.Upstream.Host == "" || (cfg.Upstream.Scheme != "http" && cfg.Upstream.Scheme != "https") {
		return nil, errors.New("proxy: upstream must be an http:// or https:// URL with a host")
	}
	if p := cfg.Upstream.Path; (p != "" && p != "/") || cfg.Upstream.RawQuery != "" || cfg.Upstream.User != nil {
		return nil, fmt.Errorf("proxy: upstream %q must be scheme and host only: the policy decides paths", cfg.Upstream.Redacted())
	}
	if cfg.Policy == nil {
		return nil, errors.New("proxy: no policy")
	}
	h := &Handler{
		upstreamScheme:  cfg.Upstream.Scheme,
		upstreamHost:    cfg.Upstream.Host,
		policy:          cfg.Policy,
		exposedPolicy:   cfg.Policy.Exposed(),
		pods:            cfg.Pods,
		notify:          cfg.Notify,
		log:             cfg.Log,
		metrics:         cfg.Metrics,
		transport:       cfg.Transport,
		upstreamTimeout: cfg.UpstreamTimeout,
		longPollSlack:   cfg.LongPollSlack,
	}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	if h.metrics == nil {
		h.metrics = NewMetrics()
	}
	if h.transport == nil {
		h.transport = NewTransport()
	}
	if h.upstreamTimeout <= 0 {
		h.upstreamTimeout = DefaultUpstreamTimeout
	}
	if h.longPollSlack <= 0 {
		h.longPollSlack = DefaultLongPollSlack
	}
	if err := cfg.Limits.validate(); err != nil {
		return nil, err
	}
	h.limits = cfg.Limits
	h.pool = newConnPool(cfg.Upstream, DefaultMaxIdleConnsPerHost, cfg.Limits.MaxUpstreamConns)
	h.clients = newClients(cfg.Limits, h.metrics, h.log)
	cache, err := newAnswerCache(cfg.Cache, h.metrics)
	if err != nil {
		return nil, err
	}
	h.cache = cache
	h.baseCtx, h.cancelBase = context.WithCancel(context.Background())
	h.upShare = newFairCap(cfg.Limits.MaxUpstreamConns, true)
	h.gets = newFlightGroup(h.baseCtx, h.upShare, false) // a new flight is one more upstream request
	h.polls = newFlightGroup(h.baseCtx, newFairCap(cfg.Limits.MaxUpstreamLongPolls, false), true)
	go h.clients.sweeper(h.baseCtx)
	h.log.Info("policy in effect", "patterns", cfg.Policy.Effective())
	h.log.Info("limits in effect (0 = off)", "pod_rate", h.limits.PodRate, "pod_burst", h.limits.PodBurst,
		"pod_max_conns", h.limits.PodMaxConns, "pod_max_long_polls", h.limits.PodMaxLongPolls,
		"max_upstream_long_polls", h.limits.MaxUpstreamLongPolls, "max_upstream_conns", h.limits.MaxUpstreamConns)
	return h, nil
}

// Close cancels every upstream long poll still open, answers their clients 503
// (shutting down, retry), waits up to 5 s for those answers to be written, and closes
// idle upstream connections.
func (h *Handler) Close() {
	h.polls.stop()
	h.cancelBase()
	h.pool.closeIdle()
	if !h.polls.wait(5 * time.Second) {
		h.log.Warn("long poll answers still being written at shutdown")
	}
}

// Header values shared by every response; the server only reads them.
var (
	hdrGoogle    = []string{"Google"}
	hdrTextPlain = []string{"text/plain; charset=utf-8"}
	hdrNoSniff   = []string{"nosniff"}
)

// ServeHTTP decides and answers one request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ci, _ := r.Context().Value(connInfoKey{}).(*connInfo)
	var cl *client
	var src source
	if ci != nil {
		cl, src = ci.client, ci.src
	} else {
		// Served without NewServer's hooks (tests, a recorder): identify per request.
		src = h.identify(r.RemoteAddr)
		cl = h.clients.acquire(src)
		defer h.clients.release(cl)
	}
	// Writing the answer has a deadline: a client that does not read it loses its
	// connection instead of pinning it. A held long poll replaces it with its own.
	if wd, ok := w.(writeDeadliner); ok {
		_ = wd.SetWriteDeadline(time.Now().Add(h.upstreamTimeout + writeGrace))
	}
	// The client's Host is never forwarded: every path upstream names the upstream's
	// own host, so Host is not a free key that makes identical polls distinct.
	r.Host = h.upstreamHost

	if r.ContentLength != 0 || r.TransferEncoding != nil {
		d := policy.Decision{Verdict: policy.Deny, Rule: policy.RuleRequestBody, TimeoutSec: -1}
		h.metrics.countRequest(d.Rule)
		h.refuseBody(w, r, ci)
		h.auditLimited(r, d, src, cl)
		return
	}
	if ci != nil && ci.over {
		h.refuse(w, cl, reasonPodConns, 1, true)
		return
	}
	if ok, retry := h.clients.allow(cl, time.Now()); !ok {
		h.refuse(w, cl, reasonRate, retry, true) // re-dialling meets the host guard's SYN limit
		return
	}

	if serveSelftest(w, r) { // the node agent's datapath self-test: selftest.go
		return
	}
	_, forwardedFor := r.Header["X-Forwarded-For"]
	d := h.policy.Evaluate(r.Method, r.RequestURI, forwardedFor)
	h.countUnattributed(src, d.Path)
	if (d.Verdict != policy.Allow || d.FilterListing) && src.exposed {
		// Only requests the policy restricts need to know whether the connection came
		// from an exposed pod (the guard's rules at its SYN): then it is served in full.
		d = h.decideExposed(r, forwardedFor, d, src, cl)
	}
	h.metrics.countRequest(d.Rule)
	switch {
	case d.Verdict != policy.Allow:
		h.block(w, r, d, src, cl)
	case d.WaitForChange:
		h.longPoll(w, r, d, cl, ci)
	default:
		h.forward(w, r, d, cl)
	}
}

// decideExposed decides a request the policy restricts again, for an exposed pod:
// allowed in full unless malformed (then d stands). Each one served is logged,
// within the pod's audit rate.
func (h *Handler) decideExposed(r *http.Request, forwardedFor bool, d policy.Decision, src source, cl *client) policy.Decision {
	e := h.exposedPolicy.Evaluate(r.Method, r.RequestURI, forwardedFor)
	if e.Verdict != policy.Allow {
		return d
	}
	if ok, dropped := h.clients.allowAudit(cl, time.Now()); ok {
		h.logDropped(src, dropped)
		h.log.LogAttrs(context.Background(), slog.LevelInfo, "metadata request served to an exposed pod",
			slog.String("rule", e.Rule.String()),
			slog.String("pod_namespace", src.pod.Namespace),
			slog.String("pod_name", src.pod.Name),
			slog.String("source_ip", src.ip),
			slog.String("path", clip(e.Path, maxAuditField)))
	}
	return e
}

func (h *Handler) block(w http.ResponseWriter, r *http.Request, d policy.Decision, src source, cl *client) {
	body := policy.ConcealedBody
	if d.Verdict == policy.Deny {
		body = d.Reason()
	}
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["X-Content-Type-Options"] = hdrNoSniff
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(http.StatusForbidden)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, body) // a client gone mid-answer is not our error
	}
	h.auditLimited(r, d, src, cl)
}

// Audit lines are bounded: each field taken from the request is clipped, so a line
// stays under 2 KiB whatever the request (JSON escaping at most sextuples a byte).
const maxAuditField = 256

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// auditLimited writes the audit line within the client's audit rate; lines over it
// are counted (metaconceal_proxy_audit_lines_dropped_total) and summarised.
func (h *Handler) auditLimited(r *http.Request, d policy.Decision, src source, cl *client) {
	ok, dropped := h.clients.allowAudit(cl, time.Now())
	if !ok {
		h.metrics.blockedByNS.WithLabelValues(cl.ns, d.Verdict.String()).Inc()
		if h.notify != nil && src.attested {
			h.notify.Blocked(src.pod, d)
		}
		return
	}
	h.logDropped(src, dropped)
	h.audit(r, d, src)
}

// logDropped summarises audit lines dropped before this one.
func (h *Handler) logDropped(src source, dropped int64) {
	if dropped == 0 {
		return
	}
	h.log.LogAttrs(context.Background(), slog.LevelWarn, "audit lines dropped: this pod exceeded its audit rate",
		slog.Int64("dropped", dropped),
		slog.String("pod_namespace", src.pod.Namespace),
		slog.String("pod_name", src.pod.Name),
		slog.String("source_ip", src.ip),
		slog.Int("audit_rate_per_second", auditRate))
}

// audit logs one line per concealed or denied request, naming the pod.
func (h *Handler) audit(r *http.Request, d policy.Decision, src source) {
	h.metrics.blockedByNS.WithLabelValues(nsLabel(src), d.Verdict.String()).Inc()
	target := clip(r.RequestURI, maxAuditField)
	h.log.LogAttrs(context.Background(), slog.LevelWarn, "metadata request blocked",
		slog.String("verdict", d.Verdict.String()),
		slog.String("rule", d.Rule.String()),
		slog.String("pod_namespace", src.pod.Namespace),
		slog.String("pod_name", src.pod.Name),
		slog.String("source_ip", src.ip),
		slog.Bool("attested", src.attested),
		slog.String("method", clip(r.Method, 16)),
		slog.String("path", clip(d.Path, maxAuditField)),
		slog.String("target", target),
	)
	if h.notify != nil && src.attested { // Events only on pods the kernel vouched for
		h.notify.Blocked(src.pod, d)
	}
}

// newUpstreamRequest builds the request the upstream sees for a long poll: the
// canonical path and query, the upstream's Host, and of the client's headers only
// Metadata-Flavor (all from key). The upstream enforces the header, so a client that
// did not send it gets the upstream's own 403, exactly as without the proxy;
// X-Forwarded-For and everything else never leave the node. A HEAD whose answer is
// filtered is sent as GET: it too is answered from a checked listing.
func (h *Handler) newUpstreamRequest(ctx context.Context, key reqKey) *http.Request {
	method := http.MethodGet
	if key.flags&keyHead != 0 && key.flags&keyFiltered == 0 {
		method = http.MethodHead
	}
	out, _ := http.NewRequestWithContext(ctx, method, "", nil) // "" cannot fail to parse
	out.URL.Scheme = h.upstreamScheme
	out.URL.Host = h.upstreamHost
	out.URL.Path = key.path
	out.URL.RawQuery = key.query
	out.Host = key.host
	if v := key.flavorValues(); v != nil {
		out.Header["Metadata-Flavor"] = v
	}
	return out
}

// forward serves a request from pod cl that is not a long poll, on the lean
// connection pool.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, d policy.Decision, cl *client) {
	if d.FilterListing {
		h.forwardFiltered(w, r, d, cl)
		return
	}
	if h.serveGET(w, r, d, cl) {
		return // answered from the cache or through a coalesced upstream GET (cache.go)
	}
	if !h.takeUpstream(w, cl) {
		return
	}
	defer h.upShare.give(cl.key)
	req := upstreamRequest{method: r.Method, host: r.Host, path: d.Path, rawQuery: d.RawQuery, flavor: forwardedFlavor(r)}
	if req.host == "" {
		req.host = h.upstreamHost
	}
	resp, release, err := h.send(r.Context(), &req)
	if err != nil {
		h.upstreamFailed(w, r, err, h.upstreamTimeout)
		return
	}
	reusable := false
	defer func() { release(reusable) }()

	copyHeader(w.Header(), resp.Header)
	w.WriteHeader(resp.StatusCode)
	if r.Method == http.MethodHead {
		reusable = true
		return
	}
	reusable = copyBody(w, resp)
}

// forwardedFlavor is the client's Metadata-Flavor header, the one header forwarded.
// Values that could split the upstream request are dropped (the upstream then
// refuses the request for lack of the header).
func forwardedFlavor(r *http.Request) []string {
	v := r.Header["Metadata-Flavor"]
	for _, s := range v {
		if !validHeaderValue(s) {
			return nil
		}
	}
	return v
}

// upstreamFailed answers 502 or 504 for an upstream error, or nothing when the
// client is already gone (its going away is what cancelled the upstream request).
func (h *Handler) upstreamFailed(w http.ResponseWriter, r *http.Request, err error, limit time.Duration) {
	if r.Context().Err() != nil {
		return
	}
	status, body := h.failureAnswer(err, limit)
	writeError(w, status, body)
}

// withheld answers 502 for a recursive listing that could not be filtered: it is
// never passed on unfiltered.
func (h *Handler) withheld(w http.ResponseWriter, r *http.Request, err error) {
	status, body := h.failureAnswer(&listingError{err}, 0)
	writeError(w, status, body)
}

// failureAnswer is the status and body for an upstream failure, and counts it.
func (h *Handler) failureAnswer(err error, limit time.Duration) (int, string) {
	var le *listingError
	var netErr net.Error
	switch {
	case errors.As(err, &le):
		h.metrics.upstreamErrors.WithLabelValues("bad_listing").Inc()
		h.log.Warn("recursive listing withheld: it could not be filtered", "err", err)
		return http.StatusBadGateway, "metaconceal: the metadata server's recursive listing could not be filtered and was withheld.\n"
	case errors.Is(err, errUpstreamBusy):
		h.metrics.upstreamErrors.WithLabelValues("busy").Inc()
		return http.StatusServiceUnavailable, "metaconceal: " + err.Error() + "; retry.\n"
	case h.baseCtx.Err() != nil:
		return http.StatusServiceUnavailable, "metaconceal: the proxy is shutting down; retry.\n"
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()):
		h.metrics.upstreamErrors.WithLabelValues("timeout").Inc()
		h.log.Warn("upstream metadata server timed out", "limit", limit, "err", err)
		return http.StatusGatewayTimeout, fmt.Sprintf("metaconceal: the metadata server did not answer within %s.\n", limit)
	}
	h.metrics.upstreamErrors.WithLabelValues("unreachable").Inc()
	h.log.Warn("upstream metadata server unreachable", "err", err)
	return http.StatusBadGateway, "metaconceal: the metadata server is unreachable: " + err.Error() + "\n"
}

func writeError(w http.ResponseWriter, status int, body string) {
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	if status == http.StatusServiceUnavailable {
		hdr["Retry-After"] = []string{"1"}
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

// rawResponse renders a complete HTTP/1.1 response with Connection: close, for an
// answer written on a connection taken over from net/http (parked long polls, refused
// bodies and connections). Hop-by-hop headers in hdr are left out; Content-Length is
// the body's, except in the answer to a HEAD (headOnly), which keeps hdr's and has no
// body.
func rawResponse(status int, hdr http.Header, body []byte, headOnly bool) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	for k, vs := range hdr {
		if hopHeaders[k] || (k == "Content-Length" && !headOnly) {
			continue
		}
		for _, v := range vs {
			b.WriteString(k)
			b.WriteString(": ")
			b.WriteString(v)
			b.WriteString("\r\n")
		}
	}
	if !headOnly {
		b.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n")
	}
	b.WriteString("Connection: close\r\n\r\n")
	if !headOnly {
		b.Write(body)
	}
	return b.Bytes()
}

// hopHeaders are connection-level headers (RFC 9110 7.6.1) never copied across.
var hopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

// copyHeader copies the upstream's end-to-end headers (Metadata-Flavor, ETag,
// Location, Content-Type, Content-Length, ...) by sharing their value slices: the
// upstream response is ours alone and the server only reads them.
func copyHeader(dst, src http.Header) {
	for k, v := range src {
		if hopHeaders[k] {
			continue
		}
		dst[k] = v
	}
}

// smallBody is the largest answer read whole and written with one Write.
const smallBody = 16 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// copyBody streams the upstream body to the client with a pooled buffer and reports
// whether it was read whole (the connection can then be reused). A body cut short
// upstream aborts the client connection, so the client sees a truncated answer and
// not a complete-looking wrong one.
func copyBody(w http.ResponseWriter, resp *http.Response) bool {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	if n := resp.ContentLength; n >= 0 && n <= smallBody {
		if n > 0 {
			if _, err := io.ReadFull(resp.Body, buf[:n]); err != nil {
				resp.Body.Close()
				panic(http.ErrAbortHandler)
			}
			_, _ = w.Write(buf[:n]) // a client gone mid-answer is not our error
		}
		return resp.Body.Close() == nil
	}
	if _, err := io.CopyBuffer(writerOnly{w}, resp.Body, buf); err != nil {
		resp.Body.Close()
		panic(http.ErrAbortHandler)
	}
	return resp.Body.Close() == nil
}

// writerOnly hides the ResponseWriter's ReadFrom so io.CopyBuffer uses our buffer.
type writerOnly struct{ io.Writer }

func readLimited(body io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(body, maxListingBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read upstream answer: %w", err)
	}
	if len(data) > maxListingBytes {
		return nil, fmt.Errorf("upstream answer larger than %d bytes", maxListingBytes)
	}
	return data, nil
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
