package proxy

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"
)

// Coalescing, one mechanism for ordinary GETs (coalesce.go) and long polls
// (longpoll.go): identical requests (the same reqKey) share one upstream request, a
// flight. Each client waiting on a flight holds a reference; the last one to give it
// back cancels the upstream request. The flight's answer is read whole and shared
// read-only by every waiter. Each kind has its own flightGroup, with its own lock.

// flight is one upstream request shared by identical client requests.
type flight struct {
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the result is set
	limit  time.Duration // how long the upstream may take (named in a 504)
	// owner is the pod charged for the flight in its group's fair cap, from its start
	// to its end, whoever waits on it meanwhile.
	owner   podKey
	charged bool // owner holds a unit of the group's cap

	// Guarded by flightGroup.mu.
	refs int // clients waiting, parked or not; a token refresh holds one of its own
	// parked are the hijacked long-poll clients waiting on the flight; nil once the
	// flight delivered (and always for GET flights, which park nobody).
	parked map[*parkedPoll]struct{}

	// Set before done is closed, read-only after.
	status int
	header http.Header
	body   []byte
	// errStatus is non-zero when the upstream failed: the answer is errStatus and
	// errBody (counted and logged once per flight, whoever waits on it).
	errStatus int
	errBody   string
}

// flightGroup holds the flights of one kind in progress, by key.
type flightGroup struct {
	base    context.Context // parent of every flight's context
	cap     *fairCap        // flights open at once, shared fairly between pods; nil: no cap
	parking bool            // its flights hold hijacked clients (long polls)

	mu      sync.Mutex
	flights map[reqKey]*flight
	closed  bool           // no new flights once stop was called
	open    int            // flights started and not yet ended
	running sync.WaitGroup // flights started and not yet answered (see answered)
}

// errFlightsFull: a new distinct flight would pass the group's cap
// (--max-upstream-long-polls).
var errFlightsFull = errors.New("upstream long polls at their cap")

// errFlightsShare: a new distinct flight would take the pod past its fair share of
// the group's cap.
var errFlightsShare = errors.New("upstream long polls at this pod's share of their cap")

// errClosing: the handler is shutting down.
var errClosing = errors.New("shutting down")

func newFlightGroup(base context.Context, cap *fairCap, parking bool) *flightGroup {
	return &flightGroup{base: base, cap: cap, parking: parking, flights: make(map[reqKey]*flight)}
}

// join returns the flight open for key with a reference for the caller, or starts
// one for pod who (started: the caller runs it, within limit, then calls
// Handler.settle). The reference is given back through leave, or unpark for a parked
// client. Joining an open flight is always allowed: it costs the upstream nothing.
func (g *flightGroup) join(key reqKey, limit time.Duration, who podKey) (f *flight, started bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, false, errClosing
	}
	if f = g.flights[key]; f != nil {
		f.refs++
		return f, false, nil
	}
	switch g.cap.take(who) {
	case capFull:
		return nil, false, errFlightsFull
	case capOverShare:
		return nil, false, errFlightsShare
	}
	f = g.startLocked(key, limit)
	f.owner, f.charged = who, g.cap != nil
	return f, true, nil
}

// startIfNone starts a flight for key holding one reference that is never given back
// (a token refresh runs to its end), unless one is already open: then it returns nil.
func (g *flightGroup) startIfNone(key reqKey, limit time.Duration) *flight {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, busy := g.flights[key]; busy || g.closed {
		return nil
	}
	return g.startLocked(key, limit)
}

func (g *flightGroup) startLocked(key reqKey, limit time.Duration) *flight {
	ctx, cancel := context.WithCancel(g.base) // the runner bounds its request by limit
	f := &flight{ctx: ctx, cancel: cancel, done: make(chan struct{}), limit: limit, refs: 1}
	if g.parking {
		f.parked = make(map[*parkedPoll]struct{})
	}
	g.flights[key] = f
	g.open++
	g.running.Add(1)
	return f
}

// leave gives back one reference; the last one cancels the upstream request.
func (g *flightGroup) leave(key reqKey, f *flight) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.leaveLocked(key, f)
}

func (g *flightGroup) leaveLocked(key reqKey, f *flight) {
	f.refs--
	if f.refs == 0 {
		if g.flights[key] == f {
			delete(g.flights, key)
		}
		f.cancel()
	}
}

// park adds a hijacked client to f's waiters; false when f has already delivered
// (the client is then answered from its result).
func (g *flightGroup) park(f *flight, p *parkedPoll) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f.parked == nil {
		return false
	}
	f.parked[p] = struct{}{}
	return true
}

// unpark removes a parked client that left before the answer and gives back its
// reference; false when delivery already took it.
func (g *flightGroup) unpark(key reqKey, f *flight, p *parkedPoll) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, waiting := f.parked[p]; !waiting {
		return false
	}
	delete(f.parked, p)
	g.leaveLocked(key, f)
	return true
}

// end is called by the flight's runner once its upstream request is done and the
// answer set: it removes the flight from the group and hands over the clients parked
// on it. abandoned: nobody waits any more.
func (g *flightGroup) end(key reqKey, f *flight) (parked []*parkedPoll, abandoned bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.open--
	if f.charged {
		g.cap.give(f.owner)
	}
	if g.flights[key] == f {
		delete(g.flights, key)
	}
	if len(f.parked) > 0 {
		parked = make([]*parkedPoll, 0, len(f.parked))
		for p := range f.parked {
			parked = append(parked, p)
		}
	}
	f.parked = nil
	return parked, f.refs == 0
}

// answered is called by a flight's runner once every client parked on it has its
// answer (or right after settle, when nobody is parked).
func (g *flightGroup) answered() { g.running.Done() }

// stop refuses new flights.
func (g *flightGroup) stop() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// wait waits up to d for the flights running to be answered, and reports whether
// they were.
func (g *flightGroup) wait(d time.Duration) bool {
	ended := make(chan struct{})
	go func() { g.running.Wait(); close(ended) }()
	select {
	case <-ended:
		return true
	case <-time.After(d):
		return false
	}
}

// len is the number of flights open (tests).
func (g *flightGroup) len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.flights)
}

// settle sets the flight's result from its upstream request: the answer, or when
// err is set the failure's answer (counted once; nothing when nobody waits any more),
// ends it in g, and wakes its waiters. It returns the clients parked on it, whom the
// caller answers.
func (h *Handler) settle(g *flightGroup, key reqKey, f *flight, status int, hdr http.Header, body []byte, err error) []*parkedPoll {
	f.status, f.header, f.body = status, hdr, body
	parked, abandoned := g.end(key, f)
	switch {
	case err == nil:
	case abandoned:
		f.errStatus, f.errBody = http.StatusBadGateway, "metaconceal: the request was cancelled.\n"
	default:
		f.errStatus, f.errBody = h.failureAnswer(err, f.limit)
	}
	f.cancel()
	close(f.done)
	return parked
}

// write answers a client that waited for f on its handler goroutine.
func (f *flight) write(w http.ResponseWriter, r *http.Request) {
	if f.errStatus != 0 {
		if r.Context().Err() == nil {
			writeError(w, f.errStatus, f.errBody)
		}
		return
	}
	dst := w.Header()
	for k, v := range f.header {
		dst[k] = v
	}
	w.WriteHeader(f.status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(f.body) // a client gone mid-answer is not our error
	}
}
