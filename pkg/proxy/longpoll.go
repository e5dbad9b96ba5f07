package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Long polls (wait_for_change=true) are where a node's proxy holds thousands of
// connections for minutes. Two things keep that cheap:
//
//   - Coalescing: identical polls (the same reqKey: method, canonical path and query,
//     incl. last_etag and timeout_sec, Metadata-Flavor, treatment of the answer) share
//     one upstream request, a flight of the Handler's polls group (flight.go). The
//     last client to leave a flight cancels it.
//   - Parking: a waiting client's connection is hijacked from net/http and parked on
//     its flight with one small goroutine that only notices the client leaving. The
//     server's per-connection goroutine, its buffers and the request's state are
//     released while the poll is held (about 3x less memory per held poll). The
//     answer is written by the flight with "Connection: close": the client reconnects
//     for its next poll, which at long-poll rates costs nothing measurable.

// parkedPoll is a hijacked client connection waiting on a flight.
type parkedPoll struct {
	conn     net.Conn
	finished atomic.Bool
	done     func() // gives back the poll's and the connection's counts
}

// joinPoll returns the open flight for a poll, starting one (and its upstream
// request) if there is none, or errClosing or errFlightsFull. The caller then holds
// a reference (see flightGroup).
func (h *Handler) joinPoll(d policy.Decision, key reqKey, who podKey) (*flight, error) {
	timeoutSec := d.TimeoutSec
	if timeoutSec <= 0 {
		// No timeout (or 0) asks the upstream to wait for a change without limit;
		// GCE still ends it within its maximum.
		timeoutSec = policy.MaxTimeoutSec
	}
	limit := time.Duration(timeoutSec)*time.Second + h.longPollSlack
	f, started, err := h.polls.join(key, limit, who)
	switch {
	case err != nil:
		return nil, err
	case started:
		go h.runPoll(key, f, d.FilterListing)
	default:
		h.metrics.coalesced.Inc()
	}
	return f, nil
}

// longPoll serves a wait_for_change=true request from client cl, on connection ci
// (nil when served without NewServer's hooks).
func (h *Handler) longPoll(w http.ResponseWriter, r *http.Request, d policy.Decision, cl *client, ci *connInfo) {
	if max := h.limits.PodMaxLongPolls; max > 0 {
		if int(cl.longPolls.Add(1)) > max {
			cl.longPolls.Add(-1)
			h.refuse(w, cl, reasonPodLongPolls, 5, false)
			return
		}
	} else {
		cl.longPolls.Add(1)
	}
	h.clients.hold(cl)
	var once sync.Once
	done := func() {
		once.Do(func() {
			cl.longPolls.Add(-1)
			h.clients.release(cl)
		})
	}
	h.metrics.longPollsOpen.Inc()
	key := h.requestKey(r, d)
	f, err := h.joinPoll(d, key, cl.key)
	if err != nil {
		h.metrics.longPollsOpen.Dec()
		done()
		switch {
		case errors.Is(err, errFlightsFull):
			h.refuse(w, cl, reasonUpstreamLongPolls, 5, false)
			return
		case errors.Is(err, errFlightsShare):
			h.refuse(w, cl, reasonShareLongPolls, 5, false)
			return
		}
		writeError(w, http.StatusServiceUnavailable, "metaconceal: the proxy is shutting down; retry.\n")
		return
	}

	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			h.park(key, f, conn, func() { done(); h.releaseConn(ci) })
			return
		}
	}
	// Not hijackable (HTTP/2, a test recorder): wait on the handler goroutine.
	defer done()
	if wd, ok := w.(writeDeadliner); ok {
		_ = wd.SetWriteDeadline(time.Time{}) // bounded by the flight's own limit
	}
	defer h.metrics.longPollsOpen.Dec()
	select {
	case <-f.done:
		f.write(w, r)
	case <-r.Context().Done():
		h.polls.leave(key, f)
	}
}

// park hands a hijacked connection to its flight. Anything the client pipelined
// after its poll is dropped: the connection closes after the answer.
func (h *Handler) park(key reqKey, f *flight, conn net.Conn, done func()) {
	p := &parkedPoll{conn: conn, done: done}
	if !h.polls.park(f, p) {
		// The flight delivered between join and hijack: answer from its result.
		<-f.done
		h.deliver([]*parkedPoll{p}, rawAnswer(f, key.flags&keyHead != 0))
		return
	}
	go h.watch(key, f, p)
}

// watch notices a parked client leaving: any read result (EOF, reset, data the
// client should not have sent before its answer) ends its wait.
func (h *Handler) watch(key reqKey, f *flight, p *parkedPoll) {
	var b [1]byte
	_, _ = p.conn.Read(b[:]) // returns on EOF, error, or when delivery closes the conn
	if h.polls.unpark(key, f, p) {
		h.unparked(p)
	}
}

// unparked closes a parked client's connection, once, and gives back its counts.
func (h *Handler) unparked(p *parkedPoll) {
	if p.finished.CompareAndSwap(false, true) {
		p.conn.Close()
		h.metrics.longPollsOpen.Dec()
		if p.done != nil {
			p.done()
		}
	}
}

// runPoll runs a long poll's flight on the upstream transport and answers the
// clients parked on it.
func (h *Handler) runPoll(key reqKey, f *flight, filter bool) {
	h.metrics.upstreamPolls.Inc()
	ctx, cancel := context.WithTimeout(f.ctx, f.limit)
	defer cancel()
	start := time.Now()
	status, hdr, body, err := h.fetchWhole(h.newUpstreamRequest(ctx, key), key.path, filter)
	h.metrics.latencyLongPoll.Observe(time.Since(start).Seconds())
	h.metrics.upstreamPolls.Dec()
	if parked := h.settle(h.polls, key, f, status, hdr, body, err); len(parked) > 0 {
		h.deliver(parked, rawAnswer(f, key.flags&keyHead != 0))
	}
	h.polls.answered()
}

// deliverWorkers bounds the goroutines writing one flight's answer to its clients.
const deliverWorkers = 32

// deliver writes answer to every parked client and closes their connections.
func (h *Handler) deliver(parked []*parkedPoll, answer []byte) {
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
				closeWrite(p.conn) // FIN after the answer, then close
				h.unparked(p)
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
// clients, with Connection: close; headOnly: the answer to a HEAD.
func rawAnswer(f *flight, headOnly bool) []byte {
	if f.errStatus != 0 {
		hdr := http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle}
		return rawResponse(f.errStatus, hdr, []byte(f.errBody), headOnly)
	}
	return rawResponse(f.status, f.header, f.body, headOnly)
}

// fetchWhole runs req on the upstream transport and reads the whole answer,
// filtering the recursive listing of path when filter is set.
func (h *Handler) fetchWhole(req *http.Request, path string, filter bool) (int, http.Header, []byte, error) {
	resp, err := h.transport.RoundTrip(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	if filter {
		hdr, filtered, err := h.filteredAnswer(path, resp.StatusCode, resp.Header, body)
		if err != nil {
			return 0, nil, nil, err
		}
		return http.StatusOK, hdr, filtered, nil
	}
	hdr := make(http.Header, len(resp.Header))
	copyHeader(hdr, resp.Header)
	return resp.StatusCode, hdr, body, nil
}
