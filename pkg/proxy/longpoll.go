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
//     one upstream request, a flight of the answerer's polls group (internal/flight).
//     The last client to leave a flight cancels it.
//   - Parking: a waiting client's connection is hijacked from net/http and parked on
//     its flight with one small goroutine that only notices the client leaving. The
//     server's per-connection goroutine, its buffers and the request's state are
//     released while the poll is held (about 3x less memory per held poll). The
//     answer is written by the flight with "Connection: close": the client reconnects
//     for its next poll, which at long-poll rates costs nothing measurable.
//
// Once the handler drains (Handler.Drain), polls are answered at once with the
// current value, as GCE answers a poll whose timeout_sec elapsed.

// parkedPoll is a hijacked client connection waiting on a flight.
type parkedPoll struct {
	conn     net.Conn
	finished atomic.Bool
	done     func() // gives back the poll's and the connection's counts
}

// longPoll serves a wait_for_change=true request.
func (a *answerer) longPoll(x *exchange) {
	key := a.requestKey(x)
	if a.draining.Load() {
		a.answerCurrent(x, key)
		return
	}
	cl := x.cl
	if n := cl.longPolls.Add(1); a.podMaxLongPolls > 0 && int(n) > a.podMaxLongPolls {
		cl.longPolls.Add(-1)
		a.respond.refused(x, reasonPodLongPolls, 5, false)
		return
	}
	a.clients.hold(cl)
	var once sync.Once
	done := func() {
		once.Do(func() {
			cl.longPolls.Add(-1)
			a.clients.release(cl)
		})
	}
	a.metrics.longPollsOpen.Inc()
	f, err := a.joinPoll(x.d, key, cl.key)
	if err != nil {
		a.metrics.longPollsOpen.Dec()
		done()
		switch {
		case errors.Is(err, errFlightsFull):
			a.respond.refused(x, reasonUpstreamLongPolls, 5, false)
		case errors.Is(err, errFlightsShare):
			a.respond.refused(x, reasonShareLongPolls, 5, false)
		default: // flight.ErrClosed
			a.respond.shuttingDown(x)
		}
		return
	}

	if hj, ok := x.w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			ci := x.conn
			a.park(f, conn, func() { done(); a.releaseConn(ci) })
			return
		}
	}
	// Not hijackable (HTTP/2, a test recorder): wait on the handler goroutine.
	defer done()
	if wd, ok := x.w.(writeDeadliner); ok {
		_ = wd.SetWriteDeadline(time.Time{}) // bounded by the flight's own limit
	}
	defer a.metrics.longPollsOpen.Dec()
	select {
	case <-f.Done():
		rp := f.Result()
		rp.write(x)
	case <-x.r.Context().Done():
		a.polls.Leave(f)
	}
}

// joinPoll returns the open flight for a poll, starting one (and its upstream
// request) if there is none, or an error: errFlightsFull, errFlightsShare,
// flight.ErrClosed. The caller then holds a reference (see internal/flight).
func (a *answerer) joinPoll(d policy.Decision, key reqKey, who podKey) (*getFlight, error) {
	timeoutSec := d.TimeoutSec
	if timeoutSec <= 0 {
		// No timeout (or 0) asks the upstream to wait for a change without limit;
		// GCE still ends it within its maximum.
		timeoutSec = policy.MaxTimeoutSec
	}
	limit := time.Duration(timeoutSec)*time.Second + a.longPollSlack
	f, started, err := a.polls.Join(key, who)
	switch {
	case err != nil:
		return nil, err
	case started:
		go a.runPoll(f, limit, d.FilterListing)
	default:
		a.metrics.coalesced.Inc()
	}
	return f, nil
}

// park hands a hijacked connection to its flight. Anything the client pipelined
// after its poll is dropped: the connection closes after the answer.
func (a *answerer) park(f *getFlight, conn net.Conn, done func()) {
	p := &parkedPoll{conn: conn, done: done}
	if !a.polls.Park(f, p) {
		// The flight delivered between join and hijack: answer from its result.
		<-f.Done()
		a.deliver(f.Result(), []*parkedPoll{p}, f.Key().head())
		return
	}
	go a.watch(f, p)
}

// watch notices a parked client leaving: any read result (EOF, reset, data the
// client should not have sent before its answer) ends its wait.
func (a *answerer) watch(f *getFlight, p *parkedPoll) {
	var b [1]byte
	_, _ = p.conn.Read(b[:]) // returns on EOF, error, or when delivery closes the conn
	if a.polls.Unpark(f, p) {
		a.unparked(p)
	}
}

// unparked closes a parked client's connection, once, and gives back its counts.
func (a *answerer) unparked(p *parkedPoll) {
	if p.finished.CompareAndSwap(false, true) {
		p.conn.Close()
		a.metrics.longPollsOpen.Dec()
		if p.done != nil {
			p.done()
		}
	}
}

// runPoll runs a long poll's flight on the upstream transport, within limit, and
// answers the clients parked on it. Once the handler drains, a poll cut short by the
// drain is answered with the current value instead.
func (a *answerer) runPoll(f *getFlight, limit time.Duration, filter bool) {
	key := f.Key()
	a.metrics.upstreamPolls.Inc()
	ctx, cancel := context.WithTimeout(f.Context(), limit)
	defer cancel()
	start := time.Now()
	status, hdr, body, err := a.fetchWhole(a.newUpstreamRequest(ctx, key), key.path, filter)
	a.metrics.latencyLongPoll.Observe(time.Since(start).Seconds())
	a.metrics.upstreamPolls.Dec()
	if err != nil && a.drainCtx.Err() != nil && a.closing.Err() == nil {
		limit = a.upstreamTimeout
		status, hdr, body, err = a.fetchCurrent(key, filter)
	}
	a.polls.Finish(f, func(abandoned bool) reply {
		return a.respond.replyOf(status, hdr, body, err, abandoned, limit)
	}, func(rp reply, parked []*parkedPoll) {
		if len(parked) > 0 {
			a.deliver(rp, parked, key.head())
		}
	})
}

// fetchCurrent asks the upstream for the value a poll waits on, without waiting
// (reqKey.current), within the upstream timeout.
func (a *answerer) fetchCurrent(key reqKey, filter bool) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(a.closing, a.upstreamTimeout)
	defer cancel()
	cur := key.current()
	return a.fetchWhole(a.newUpstreamRequest(ctx, cur), cur.path, filter)
}

// answerCurrent answers a poll that arrives while the handler drains with the current
// value, on the handler goroutine.
func (a *answerer) answerCurrent(x *exchange, key reqKey) {
	status, hdr, body, err := a.fetchCurrent(key, x.d.FilterListing)
	if err != nil {
		a.respond.failed(x, err, a.upstreamTimeout)
		return
	}
	rp := reply{status: status, header: hdr, body: body}
	rp.write(x)
}

// deliverWorkers bounds the goroutines writing one flight's answer to its clients.
const deliverWorkers = 32

// deliver writes rp to every parked client and closes their connections.
func (a *answerer) deliver(rp reply, parked []*parkedPoll, headOnly bool) {
	answer := rp.raw(headOnly)
	work := make(chan *parkedPoll)
	var wg sync.WaitGroup
	for range min(deliverWorkers, len(parked)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range work {
				// A client that does not read its answer in time is dropped.
				_ = p.conn.SetWriteDeadline(time.Now().Add(writeGrace))
				_, _ = p.conn.Write(answer)
				closeWrite(p.conn) // FIN after the answer, then close
				a.unparked(p)
			}
		}()
	}
	for _, p := range parked {
		work <- p
	}
	close(work)
	wg.Wait()
}

// fetchWhole runs req on the upstream transport and reads the whole answer,
// filtering the recursive listing of path when filter is set.
func (a *answerer) fetchWhole(req *http.Request, path string, filter bool) (int, http.Header, []byte, error) {
	resp, err := a.transport.RoundTrip(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	if filter {
		hdr, filtered, err := a.filteredAnswer(path, resp.StatusCode, resp.Header, body)
		if err != nil {
			return 0, nil, nil, err
		}
		return http.StatusOK, hdr, filtered, nil
	}
	hdr := make(http.Header, len(resp.Header))
	copyHeader(hdr, resp.Header)
	return resp.StatusCode, hdr, body, nil
}
