package proxy

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// flight is one upstream long poll shared by every client that asked the identical
// canonical request (method, path, query incl. last_etag and timeout_sec,
// Metadata-Flavor, Host) while it was open.
type flight struct {
	cancel context.CancelFunc
	refs   int // clients waiting; guarded by Handler.mu
	done   chan struct{}

	// Set before done is closed, read-only after.
	status  int
	header  http.Header
	body    []byte
	err     error
	timeout time.Duration
}

// longPollKey identifies identical long polls. The request's path and query are
// already canonical, so spellings that mean the same share a flight.
func longPollKey(r *http.Request, d policy.Decision) string {
	var b strings.Builder
	b.Grow(len(r.Method) + len(d.Path) + len(d.RawQuery) + len(r.Host) + 32)
	b.WriteString(r.Method)
	b.WriteByte(' ')
	b.WriteString(d.Path)
	b.WriteByte('?')
	b.WriteString(d.RawQuery)
	b.WriteByte(0)
	for _, v := range r.Header["Metadata-Flavor"] {
		b.WriteString(v)
		b.WriteByte(1)
	}
	b.WriteByte(0)
	b.WriteString(r.Host)
	return b.String()
}

// longPoll serves a wait_for_change=true request. The client waits on a shared
// upstream request; if it goes away first it leaves, and the last one to leave
// cancels the upstream request.
func (h *Handler) longPoll(w http.ResponseWriter, r *http.Request, d policy.Decision) {
	h.metrics.longPollsOpen.Inc()
	defer h.metrics.longPollsOpen.Dec()

	key := longPollKey(r, d)
	h.mu.Lock()
	f := h.flights[key]
	if f == nil {
		timeoutSec := d.TimeoutSec
		if timeoutSec <= 0 {
			// No timeout (or 0) asks the upstream to wait for a change without limit;
			// GCE still ends it within its maximum.
			timeoutSec = policy.MaxTimeoutSec
		}
		limit := time.Duration(timeoutSec)*time.Second + h.longPollSlack
		ctx, cancel := context.WithTimeout(h.baseCtx, limit)
		f = &flight{cancel: cancel, done: make(chan struct{}), timeout: limit}
		h.flights[key] = f
		go h.runFlight(ctx, key, f, h.newUpstreamRequest(ctx, r, d), d)
	} else {
		h.metrics.coalesced.Inc()
	}
	f.refs++
	h.mu.Unlock()

	select {
	case <-f.done:
		h.writeFlight(w, r, f)
	case <-r.Context().Done():
		h.mu.Lock()
		f.refs--
		if f.refs == 0 {
			if h.flights[key] == f {
				delete(h.flights, key)
			}
			f.cancel()
		}
		h.mu.Unlock()
	}
}

func (h *Handler) runFlight(ctx context.Context, key string, f *flight, req *http.Request, d policy.Decision) {
	h.metrics.upstreamPolls.Inc()
	defer h.metrics.upstreamPolls.Dec()
	start := time.Now()
	f.status, f.header, f.body, f.err = h.fetchWhole(req, d)
	h.metrics.latencyLongPoll.Observe(time.Since(start).Seconds())

	h.mu.Lock()
	if h.flights[key] == f {
		delete(h.flights, key)
	}
	h.mu.Unlock()
	close(f.done)
	f.cancel()
	_ = ctx // the request carries it; kept for clarity of ownership
}

// fetchWhole runs req and reads the whole answer, filtering recursive listings.
func (h *Handler) fetchWhole(req *http.Request, d policy.Decision) (int, http.Header, []byte, error) {
	resp, err := h.transport.RoundTrip(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	hdr := make(http.Header, len(resp.Header))
	copyHeader(hdr, resp.Header)
	if d.FilterListing && resp.StatusCode == http.StatusOK && req.Method != http.MethodHead {
		filtered, err := h.policy.FilterListing(d.Path, body)
		if err != nil {
			return 0, nil, nil, &listingError{err}
		}
		body = filtered
		hdr["Content-Length"] = []string{itoa(len(body))}
	} else if d.FilterListing && req.Method == http.MethodHead {
		hdr.Del("Content-Length")
	}
	return resp.StatusCode, hdr, body, nil
}

type listingError struct{ err error }

func (e *listingError) Error() string { return e.err.Error() }
func (e *listingError) Unwrap() error { return e.err }

func (h *Handler) writeFlight(w http.ResponseWriter, r *http.Request, f *flight) {
	if f.err != nil {
		if le, ok := f.err.(*listingError); ok {
			h.withheld(w, r, le.err)
			return
		}
		h.upstreamFailed(w, r, f.err, f.timeout)
		return
	}
	dst := w.Header()
	for k, v := range f.header {
		dst[k] = v
	}
	w.WriteHeader(f.status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(f.body)
	}
}
