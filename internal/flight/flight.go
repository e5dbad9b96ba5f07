// Package flight shares one piece of work (a flight) between identical callers, as
// golang.org/x/sync/singleflight does, with what a proxy holding thousands of waiters
// needs on top of it:
//
//   - reference-counted cancel: each waiter holds a reference; the last one to give
//     it back cancels the flight's context (the work stops when nobody waits);
//   - a cap on the flights open at once, charged to the owner that started each one
//     (Cap), taken when a flight starts and given back when it finishes;
//   - parking: a waiter that is not a goroutine (a value of type P, e.g. a hijacked
//     connection) waits on the flight and is handed to the finisher with the result;
//   - OnDone, told of every flight once all its waiters have their answer.
//
// A flight's runner ends it with one call, Finish, which sets the result, wakes the
// waiting goroutines, hands over the parked waiters and counts the flight answered:
// there is no second step to forget. Nothing here knows about HTTP.
package flight

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Cap bounds the flights open at once. Take is asked before a flight starts, for the
// owner that starts it, and refuses with an error that Join returns as is; Give gives
// back a unit Take granted, when the flight finishes.
type Cap[O any] interface {
	Take(owner O) error
	Give(owner O)
}

// ErrClosed is Join's error once Stop was called.
var ErrClosed = errors.New("flight group closed")

// Config configures a Group. The zero value works: no cap, no parking, no hook.
type Config[O any] struct {
	// Base is the parent of every flight's context; nil means context.Background.
	Base context.Context
	// Cap bounds the flights open at once; nil means no bound.
	Cap Cap[O]
	// Parking lets waiters of type P park on a flight (Park).
	Parking bool
	// OnDone is called after each flight's Finish, once its parked waiters are
	// answered.
	OnDone func()
}

// Group holds the flights in progress, by key K. O names who starts a flight (the
// cap's owner), R is a flight's result and P a parked waiter.
type Group[K comparable, O any, R any, P comparable] struct {
	cfg Config[O]

	mu      sync.Mutex
	flights map[K]*Flight[K, O, R, P]
	closed  bool
	running sync.WaitGroup // flights started and not yet finished
}

// Flight is one piece of work shared by the callers that asked for the same key.
type Flight[K comparable, O any, R any, P comparable] struct {
	key     K
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
	owner   O
	charged bool // owner holds a unit of the group's cap

	// Guarded by Group.mu.
	refs     int
	parked   map[P]struct{} // nil once finished, and without parking
	finished bool

	result R // set before done is closed, read-only after
}

// New returns an empty group.
func New[K comparable, O any, R any, P comparable](cfg Config[O]) *Group[K, O, R, P] {
	if cfg.Base == nil {
		cfg.Base = context.Background()
	}
	return &Group[K, O, R, P]{cfg: cfg, flights: make(map[K]*Flight[K, O, R, P])}
}

// Context is the flight's context: cancelled when the last waiter leaves, when the
// group's base ends, and after Finish.
func (f *Flight[K, O, R, P]) Context() context.Context { return f.ctx }

// Key is the key the flight was started for.
func (f *Flight[K, O, R, P]) Key() K { return f.key }

// Done is closed once the flight's result is set.
func (f *Flight[K, O, R, P]) Done() <-chan struct{} { return f.done }

// Result is the flight's result; only after Done is closed.
func (f *Flight[K, O, R, P]) Result() R { return f.result }

// Join returns the flight open for key with a reference for the caller, or starts
// one for owner: started says the caller must run it and end it with Finish. The
// reference is given back with Leave (or Unpark, for a parked waiter). Joining an open
// flight is always allowed (it costs no more work); starting one may be refused by
// the cap (its error) or because the group is closed (ErrClosed).
func (g *Group[K, O, R, P]) Join(key K, owner O) (f *Flight[K, O, R, P], started bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, false, ErrClosed
	}
	if f = g.flights[key]; f != nil {
		f.refs++
		return f, false, nil
	}
	if g.cfg.Cap != nil {
		if err := g.cfg.Cap.Take(owner); err != nil {
			return nil, false, err
		}
	}
	f = g.startLocked(key)
	f.owner, f.charged = owner, g.cfg.Cap != nil
	return f, true, nil
}

// StartIfNone starts a flight for key, uncharged, holding one reference that is never
// given back (the flight runs to its end whoever else joins and leaves), unless one is
// already open or the group is closed: then it returns nil. The caller must Finish it.
func (g *Group[K, O, R, P]) StartIfNone(key K) *Flight[K, O, R, P] {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, busy := g.flights[key]; busy || g.closed {
		return nil
	}
	return g.startLocked(key)
}

func (g *Group[K, O, R, P]) startLocked(key K) *Flight[K, O, R, P] {
	ctx, cancel := context.WithCancel(g.cfg.Base)
	f := &Flight[K, O, R, P]{key: key, ctx: ctx, cancel: cancel, done: make(chan struct{}), refs: 1}
	if g.cfg.Parking {
		f.parked = make(map[P]struct{})
	}
	g.flights[key] = f
	g.running.Add(1)
	return f
}

// Leave gives back one reference; the last one cancels the flight's context and
// removes it from the group (a new Join starts a new flight).
func (g *Group[K, O, R, P]) Leave(f *Flight[K, O, R, P]) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.leaveLocked(f)
}

func (g *Group[K, O, R, P]) leaveLocked(f *Flight[K, O, R, P]) {
	f.refs--
	if f.refs == 0 {
		if g.flights[f.key] == f {
			delete(g.flights, f.key)
		}
		f.cancel()
	}
}

// Park adds p to f's waiters, keeping the reference p's Join took; false when f has
// already finished (p is then answered from f's result by the caller).
func (g *Group[K, O, R, P]) Park(f *Flight[K, O, R, P], p P) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if f.parked == nil {
		return false
	}
	f.parked[p] = struct{}{}
	return true
}

// Unpark removes a parked waiter that left before the answer and gives back its
// reference; false when Finish already handed it over.
func (g *Group[K, O, R, P]) Unpark(f *Flight[K, O, R, P], p P) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, waiting := f.parked[p]; !waiting {
		return false
	}
	delete(f.parked, p)
	g.leaveLocked(f)
	return true
}

// Finish ends f, once: it removes f from the group and gives back its cap unit, asks
// result for the result (abandoned: nobody waits any more), sets it and wakes every
// waiting goroutine, calls deliver (when not nil) with the result and the parked
// waiters, and only then counts f answered and calls OnDone. A second call does
// nothing.
func (g *Group[K, O, R, P]) Finish(f *Flight[K, O, R, P], result func(abandoned bool) R, deliver func(R, []P)) {
	g.mu.Lock()
	if f.finished {
		g.mu.Unlock()
		return
	}
	f.finished = true
	if f.charged {
		g.cfg.Cap.Give(f.owner)
	}
	if g.flights[f.key] == f {
		delete(g.flights, f.key)
	}
	var parked []P
	if len(f.parked) > 0 {
		parked = make([]P, 0, len(f.parked))
		for p := range f.parked {
			parked = append(parked, p)
		}
	}
	f.parked = nil
	abandoned := f.refs == 0
	g.mu.Unlock()

	f.result = result(abandoned)
	f.cancel()
	close(f.done)
	if deliver != nil {
		deliver(f.result, parked)
	}
	g.running.Done()
	if g.cfg.OnDone != nil {
		g.cfg.OnDone()
	}
}

// Open calls fn for every flight open now (started and not yet finished nor
// abandoned by its last waiter), without the group's lock held.
func (g *Group[K, O, R, P]) Open(fn func(*Flight[K, O, R, P])) {
	g.mu.Lock()
	open := make([]*Flight[K, O, R, P], 0, len(g.flights))
	for _, f := range g.flights {
		open = append(open, f)
	}
	g.mu.Unlock()
	for _, f := range open {
		fn(f)
	}
}

// Stop refuses new flights from now on (Join answers ErrClosed).
func (g *Group[K, O, R, P]) Stop() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// Wait waits up to d for every flight started to finish (delivery included) and
// reports whether they did.
func (g *Group[K, O, R, P]) Wait(d time.Duration) bool {
	ended := make(chan struct{})
	go func() { g.running.Wait(); close(ended) }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ended:
		return true
	case <-t.C:
		return false
	}
}

// Len is the number of flights open.
func (g *Group[K, O, R, P]) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.flights)
}
