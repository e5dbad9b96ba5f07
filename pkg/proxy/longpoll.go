package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Long polls (wait_for_change=true) are where a node's proxy holds thousands of
// connections for minutes. Two things keep that cheap:
//
//   - Coalescing: identical polls (same method, canonical path and query, incl.
//     last_etag and timeout_sec, same Metadata-Flavor and Host) share one upstream
//     request, a flight. The last client to leave a flight cancels it.
//   - Parking: a waiting client's connection is hijacked from net/http and parked on
//     its flight with one small goroutine that only notices the client leaving. The
//     server's per-connection goroutine, its buffers and the request's state are
//     released while the poll is held (about 3x less memory per held poll). The
//     answer is written by the flight with "Connection: close": the client reconnects
//     for its next poll, which at long-poll rates costs nothing measurable.

// flight is one upstream long poll shared by identical client polls.
type flight struct {
	cancel   context.CancelFunc
	timeout  time.Duration
	headOnly bool          // HEAD: the answer has headers only
	done     chan struct{} // closed when the result is set

	// Guarded by Handler.mu.
	refs   int                      // clients waiting, parked or not
	parked map[*parkedPoll]struct{} // nil once the flight delivered

	// Set before done is closed, read-only after.
	status int
	header http.Header
	body   []byte
	err    error
}

// parkedPoll is a hijacked client connection waiting on a flight.
type parkedPoll struct {
	conn     net.Conn
	finished atomic.Bool
}

// longPollKey identifies identical long polls. The request's path and query are
// already canonical, so spellings that mean the same share a flight; polls whose
// answers are treated differently (filtered or served in full) never do.
func longPollKey(r *http.Request, d policy.Decision) string {
	var b strings.Builder
	b.Grow(len(r.Method) + len(d.Path) + len(d.RawQuery) + len(r.Host) + 32)
	b.WriteString(r.Method)
	b.WriteByte(' ')
	b.WriteString(d.Path)
	b.WriteByte('?')
	b.WriteString(d.RawQuery)
	b.WriteByte(0)
	for _, v := range forwardedFlavor(r) {
		b.WriteString(v)
		b.WriteByte(1)
	}
	b.WriteByte(0)
	b.WriteString(r.Host)
	// The same request can get different answers by who asks: filtered for a
	// concealed pod, in full for an exposed one. Such polls never share a flight.
	b.WriteByte(0)
	if d.FilterListing {
		b.WriteByte('f')
	}
	if d.Rule == policy.RuleExposedPod {
		b.WriteByte('e')
	}
	return b.String()
}

// joinFlight returns the open flight for r, starting one if there is none, or nil
// once the handler is closing. The caller holds h.mu, and then a reference it must
// give back through leaveLocked (or delivery).
func (h *Handler) joinFlight(r *http.Request, d policy.Decision, key string) *flight {
	if h.closed {
		return nil
	}
	f := h.flights[key]
	if f != nil {
		h.metrics.coalesced.Inc()
		f.refs++
		return f
	}
	timeoutSec := d.TimeoutSec
	if timeoutSec <= 0 {
		// No timeout (or 0) asks the upstream to wait for a change without limit;
		// GCE still ends it within its maximum.
		timeoutSec = policy.MaxTimeoutSec
	}
	limit := time.Duration(timeoutSec)*time.Second + h.longPollSlack
	ctx, cancel := context.WithTimeout(h.baseCtx, limit)
	f = &flight{cancel: cancel, done: make(chan struct{}), timeout: limit, parked: map[*parkedPoll]struct{}{}, refs: 1,
		headOnly: r.Method == http.MethodHead}
	h.flights[key] = f
	h.running.Add(1)
	go h.runFlight(key, f, h.newUpstreamRequest(ctx, r, d), d)
	return f
}

// leave gives back one reference; the last one cancels the upstream request.
// The caller holds h.mu.
func (h *Handler) leaveLocked(key string, f *flight) {
	f.refs--
	if f.refs == 0 {
		if h.flights[key] == f {
			delete(h.flights, key)
		}
		f.cancel()
	}
}

// longPoll serves a wait_for_change=true request.
func (h *Handler) longPoll(w http.ResponseWriter, r *http.Request, d policy.Decision) {
	h.metrics.longPollsOpen.Inc()
	key := longPollKey(r, d)

	h.mu.Lock()
	f := h.joinFlight(r, d, key)
	h.mu.Unlock()
	if f == nil {
		h.metrics.longPollsOpen.Dec()
		writeError(w, http.StatusServiceUnavailable, "metaconceal: the proxy is shutting down; retry.\n")
		return
	}

	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			h.park(key, f, conn)
			return
		}
	}
	// Not hijackable (HTTP/2, a test recorder): wait on the handler goroutine.
	defer h.metrics.longPollsOpen.Dec()
	select {
	case <-f.done:
		h.writeFlight(w, r, f)
	case <-r.Context().Done():
		h.mu.Lock()
		h.leaveLocked(key, f)
		h.mu.Unlock()
	}
}

// park hands a hijacked connection to its flight. Anything the client pipelined
// after its poll is dropped: the connection closes after the answer.
func (h *Handler) park(key string, f *flight, conn net.Conn) {
	p := &parkedPoll{conn: conn}
	h.mu.Lock()
	if f.parked == nil {
		// The flight delivered between join and hijack: answer from its result.
		h.mu.Unlock()
		<-f.done
		h.deliver(f, []*parkedPoll{p}, f.rawAnswer(h))
		return
	}
	f.parked[p] = struct{}{}
	h.mu.Unlock()
	go h.watch(key, f, p)
}

// watch notices a parked client leaving: any read result (EOF, reset, data the
// client should not have sent before its answer) ends its wait.
func (h *Handler) watch(key string, f *flight, p *parkedPoll) {
	var b [1]byte
	_, _ = p.conn.Read(b[:]) // returns on EOF, error, or when delivery closes the conn
	h.mu.Lock()
	_, waiting := f.parked[p]
	if waiting {
		delete(f.parked, p)
		h.leaveLocked(key, f)
	}
	h.mu.Unlock()
	if waiting {
		h.finish(p)
	}
}

func (h *Handler) finish(p *parkedPoll) {
	if p.finished.CompareAndSwap(false, true) {
		p.conn.Close()
		h.metrics.longPollsOpen.Dec()
	}
}

func (h *Handler) runFlight(key string, f *flight, req *http.Request, d policy.Decision) {
	defer h.running.Done()
	h.metrics.upstreamPolls.Inc()
	start := time.Now()
	f.status, f.header, f.body, f.err = h.fetchWhole(req, d)
	h.metrics.latencyLongPoll.Observe(time.Since(start).Seconds())
	h.metrics.upstreamPolls.Dec()

	h.mu.Lock()
	if h.flights[key] == f {
		delete(h.flights, key)
	}
	parked := make([]*parkedPoll, 0, len(f.parked))
	for p := range f.parked {
		parked = append(parked, p)
	}
	f.parked = nil
	h.mu.Unlock()
	close(f.done)
	f.cancel()
	if len(parked) > 0 {
		h.deliver(f, parked, f.rawAnswer(h))
	}
}

// deliverWorkers bounds the goroutines writing one flight's answer to its clients.
const deliverWorkers = 32

// deliver writes answer to every parked client and closes their connections.
func (h *Handler) deliver(f *flight, parked []*parkedPoll, answer []byte) {
	work := make(chan *parkedPoll)
	var wg sync.WaitGroup
	for range min(deliverWorkers, len(parked)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range work {
				// A client that does not read its answer in 10s is dropped.
				_ = p.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
				_, _ = p.conn.Write(answer)
				if tc, ok := p.conn.(*net.TCPConn); ok {
					_ = tc.CloseWrite() // FIN after the answer, then close
				}
				h.finish(p)
			}
		}()
	}
	for _, p := range parked {
		work <- p
	}
	close(work)
	wg.Wait()
}

// rawAnswer renders the flight's result as a complete HTTP/1.1 response for parked
// clients, with Connection: close.
func (f *flight) rawAnswer(h *Handler) []byte {
	status, hdr, body := f.status, f.header, f.body
	if f.err != nil {
		var text string
		status, text = h.failureAnswer(f.err, f.timeout)
		body = []byte(text)
		hdr = http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle}
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	for k, vs := range hdr {
		if hopHeaders[k] || (k == "Content-Length" && !f.headOnly) {
			continue
		}
		for _, v := range vs {
			b.WriteString(k)
			b.WriteString(": ")
			b.WriteString(v)
			b.WriteString("\r\n")
		}
	}
	if !f.headOnly {
		b.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n")
	}
	b.WriteString("Connection: close\r\n\r\n")
	if !f.headOnly {
		b.Write(body)
	}
	return b.Bytes()
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
	switch {
	case d.FilterListing && resp.StatusCode == http.StatusOK && req.Method == http.MethodHead:
		hdr.Del("Content-Length") // the filtered body's length is not known
	case d.FilterListing && resp.StatusCode == http.StatusOK:
		filtered, err := h.policy.FilterListing(d.Path, body)
		if err != nil {
			return 0, nil, nil, &listingError{err}
		}
		body = filtered
		hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	return resp.StatusCode, hdr, body, nil
}

// listingError is a recursive listing that could not be filtered.
type listingError struct{ err error }

func (e *listingError) Error() string { return e.err.Error() }
func (e *listingError) Unwrap() error { return e.err }

// writeFlight answers a client that waited on its handler goroutine.
func (h *Handler) writeFlight(w http.ResponseWriter, r *http.Request, f *flight) {
	if f.err != nil {
		status, body := h.failureAnswer(f.err, f.timeout)
		writeError(w, status, body)
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

// failureAnswer is the status and body for an upstream failure, and counts it.
func (h *Handler) failureAnswer(err error, limit time.Duration) (int, string) {
	var le *listingError
	var netErr net.Error
	switch {
	case errors.As(err, &le):
		h.metrics.upstreamErrors.WithLabelValues("bad_listing").Inc()
		h.log.Warn("recursive listing withheld: it could not be filtered", "err", err)
		return http.StatusBadGateway, "metaconceal: the metadata server's recursive listing could not be filtered and was withheld.\n"
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
