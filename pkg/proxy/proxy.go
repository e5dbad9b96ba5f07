// Package proxy is the HTTP side of metaconceal-proxy: it asks pkg/policy about each
// request, answers concealed and denied requests itself (and audits them), and sends
// allowed ones upstream in their canonical form only.
//
// The upstream path is deliberately lean: one pooled http.Transport sized for the
// concurrency, direct RoundTrip calls, only the headers that matter forwarded, pooled
// copy buffers, and no httputil.ReverseProxy. Long polls (wait_for_change=true) are
// coalesced: identical polls share one upstream request, cancelled when the last
// client waiting on it goes away.
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
	Pods    PodLookup
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
}

// Handler is the proxy's http.Handler.
type Handler struct {
	upstreamScheme, upstreamHost string
	policy                       *policy.Policy
	exposedPolicy                *policy.Policy // for pods the plugin left unconcealed
	pods                         PodLookup
	log                          *slog.Logger
	metrics                      *Metrics
	transport                    http.RoundTripper
	upstreamTimeout              time.Duration
	longPollSlack                time.Duration

	pool       *connPool       // ordinary requests
	baseCtx    context.Context // parent of every coalesced upstream long poll
	cancelBase context.CancelFunc

	mu      sync.Mutex
	flights map[string]*flight
	closed  bool           // no new flights once Close started
	running sync.WaitGroup // flights not yet delivered
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
		log:             cfg.Log,
		metrics:         cfg.Metrics,
		transport:       cfg.Transport,
		upstreamTimeout: cfg.UpstreamTimeout,
		longPollSlack:   cfg.LongPollSlack,
		flights:         make(map[string]*flight),
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
	h.pool = newConnPool(cfg.Upstream, DefaultMaxIdleConnsPerHost)
	h.baseCtx, h.cancelBase = context.WithCancel(context.Background())
	return h, nil
}

// Close cancels every upstream long poll still open, answers their clients 503
// (shutting down, retry), waits up to 5 s for those answers to be written, and closes
// idle upstream connections.
func (h *Handler) Close() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	h.cancelBase()
	h.pool.closeIdle()
	delivered := make(chan struct{})
	go func() { h.running.Wait(); close(delivered) }()
	select {
	case <-delivered:
	case <-time.After(5 * time.Second):
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
	_, forwardedFor := r.Header["X-Forwarded-For"]
	d := h.policy.Evaluate(r.Method, r.RequestURI, forwardedFor)
	var src source
	if d.Verdict != policy.Allow || d.FilterListing {
		// Only requests the policy restricts need to know the pod: an exposed one
		// (mode EXPOSED, excluded namespace) is served in full, and a blocked one is
		// audited with its name.
		src = h.source(r)
		if src.pod.Exposed {
			if e := h.exposedPolicy.Evaluate(r.Method, r.RequestURI, forwardedFor); e.Verdict == policy.Allow {
				d = e
				h.log.LogAttrs(context.Background(), slog.LevelInfo, "metadata request served to an exposed pod",
					slog.String("rule", d.Rule.String()),
					slog.String("pod_namespace", src.pod.Namespace),
					slog.String("pod_name", src.pod.Name),
					slog.String("source_ip", src.ip),
					slog.String("path", d.Path))
			}
		}
	}
	h.metrics.countRequest(d.Rule)
	switch {
	case d.Verdict != policy.Allow:
		h.block(w, r, d, src)
	case d.WaitForChange:
		h.longPoll(w, r, d)
	default:
		h.forward(w, r, d)
	}
}

// source is who sent a request: its IP and, from the state records, its pod.
type source struct {
	ip  string
	pod podindex.Pod // zero when the IP has no state record
}

func (h *Handler) source(r *http.Request) source {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return source{ip: r.RemoteAddr}
	}
	s := source{ip: ap.Addr().Unmap().String()}
	if h.pods != nil {
		s.pod, _ = h.pods.Lookup(ap.Addr())
	}
	return s
}

func (h *Handler) block(w http.ResponseWriter, r *http.Request, d policy.Decision, src source) {
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
	h.audit(r, d, src)
}

// audit logs one line per concealed or denied request, naming the pod.
func (h *Handler) audit(r *http.Request, d policy.Decision, src source) {
	nsLabel := src.pod.Namespace
	if nsLabel == "" {
		nsLabel = "unknown"
	}
	h.metrics.blockedByNS.WithLabelValues(nsLabel, d.Verdict.String()).Inc()
	target := r.RequestURI
	if len(target) > 512 {
		target = target[:512] + "..."
	}
	h.log.LogAttrs(context.Background(), slog.LevelWarn, "metadata request blocked",
		slog.String("verdict", d.Verdict.String()),
		slog.String("rule", d.Rule.String()),
		slog.String("pod_namespace", src.pod.Namespace),
		slog.String("pod_name", src.pod.Name),
		slog.String("source_ip", src.ip),
		slog.String("method", r.Method),
		slog.String("path", d.Path),
		slog.String("target", target),
	)
}

// newUpstreamRequest builds the request the upstream sees: the canonical path and
// query, the client's Host (so an absolute Location names what the client used), and
// of the client's headers only Metadata-Flavor. The upstream enforces the header, so
// a client that did not send it gets the upstream's own 403, exactly as without the
// proxy; X-Forwarded-For and everything else never leave the node.
func (h *Handler) newUpstreamRequest(ctx context.Context, r *http.Request, d policy.Decision) *http.Request {
	out, _ := http.NewRequestWithContext(ctx, r.Method, "", nil) // "" cannot fail to parse
	out.URL.Scheme = h.upstreamScheme
	out.URL.Host = h.upstreamHost
	out.URL.Path = d.Path
	out.URL.RawQuery = d.RawQuery
	out.Host = r.Host
	if out.Host == "" {
		out.Host = h.upstreamHost
	}
	if v := forwardedFlavor(r); v != nil {
		out.Header["Metadata-Flavor"] = v
	}
	return out
}

// forward serves a request that is not a long poll, on the lean connection pool.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, d policy.Decision) {
	req := upstreamRequest{method: r.Method, host: r.Host, path: d.Path, rawQuery: d.RawQuery, flavor: forwardedFlavor(r)}
	if req.host == "" {
		req.host = h.upstreamHost
	}
	start := time.Now()
	resp, release, err := h.pool.roundTrip(r.Context(), &req, start.Add(h.upstreamTimeout))
	if err != nil {
		h.upstreamFailed(w, r, err, h.upstreamTimeout)
		return
	}
	h.metrics.latencyRequest.Observe(time.Since(start).Seconds())
	reusable := false
	defer func() { release(reusable) }()

	if d.FilterListing && resp.StatusCode == http.StatusOK {
		if r.Method == http.MethodHead {
			copyHeader(w.Header(), resp.Header)
			w.Header().Del("Content-Length") // the filtered body's length is not known
			w.WriteHeader(resp.StatusCode)
			reusable = true
			return
		}
		body, err := readLimited(resp.Body)
		if err == nil {
			reusable = resp.Body.Close() == nil
			body, err = h.policy.FilterListing(d.Path, body)
		}
		if err != nil {
			h.withheld(w, r, err)
			return
		}
		writeBuffered(w, resp.StatusCode, resp.Header, body)
		return
	}

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

func writeError(w http.ResponseWriter, status int, body string) {
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
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

func writeBuffered(w http.ResponseWriter, status int, src http.Header, body []byte) {
	copyHeader(w.Header(), src)
	w.Header()["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	_, _ = w.Write(body)
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
