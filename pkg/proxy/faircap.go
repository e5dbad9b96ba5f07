package proxy

import (
	"errors"
	"sync"
)

// Fair shares of the node-wide caps (Limits.MaxUpstreamLongPolls, MaxUpstreamConns).
// A cap is first come, first served only up to a point: no pod holds more than its
// share of it, and the last part of it, the reserve, goes only to pods that hold
// little of it. So a pod (or a few) taking all they can leaves room for the others:
//
//	share   = max(1, cap/capShareDiv)        a pod over it is answered 429
//	reserve = cap/capReserveDiv              the last units of the cap...
//	small   = max(1, reserve/capReserveFor)  ...go only to pods holding fewer than this
//
// With the defaults: long polls (1,024) share 128, reserve 256 for pods holding
// under 8; upstream requests (512) share 64, reserve 128 for pods holding under 4.
// The reserve serves at least capReserveFor pods each taking up to small of it. A
// pod over its share is told 429 at once (its own doing); when the whole cap is
// taken, a long poll is refused 503 and an upstream request waits up to 1 s for a
// slot (the pool's, upstream.go), then 503, as before.
const (
	capShareDiv   = 8
	capReserveDiv = 4
	capReserveFor = 32
)

// fairCap is one node-wide cap shared fairly between pods (see above). A nil
// *fairCap is no cap.
type fairCap struct {
	max, share, reserve, small int
	// queue: the cap itself is enforced elsewhere, with a wait (the upstream pool's
	// slots); a unit is still taken over max, by a pod holding under small, and the
	// request waits there.
	queue bool

	mu   sync.Mutex
	used int
	held map[podKey]int // pods holding at least one unit
}

// newFairCap returns the fair cap for n units; nil (no cap) when n is 0. queue: see
// fairCap.queue.
func newFairCap(n int, queue bool) *fairCap {
	if n <= 0 {
		return nil
	}
	reserve := n / capReserveDiv
	return &fairCap{
		max:     n,
		queue:   queue,
		share:   max(1, n/capShareDiv),
		reserve: reserve,
		small:   max(1, reserve/capReserveFor),
		held:    make(map[podKey]int),
	}
}

// capVerdict is fairCap.take's answer.
type capVerdict uint8

const (
	capTaken     capVerdict = iota
	capOverShare            // the pod holds its share, or the rest is the reserve and it holds more than a little: 429
	capFull                 // every unit is taken (and the cap does not queue): 503
)

// take takes one unit for pod k.
func (c *fairCap) take(k podKey) capVerdict {
	if c == nil {
		return capTaken
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.held[k]
	switch {
	case h >= c.share, c.used >= c.max-c.reserve && h >= c.small:
		return capOverShare
	case c.used >= c.max && !c.queue:
		return capFull
	}
	c.held[k] = h + 1
	c.used++
	return capTaken
}

// give gives back one unit pod k took.
func (c *fairCap) give(k podKey) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.used--
	if h := c.held[k] - 1; h > 0 {
		c.held[k] = h
	} else {
		delete(c.held, k)
	}
}

// errFlightsFull: a new distinct flight would pass the group's cap
// (Limits.MaxUpstreamLongPolls).
var errFlightsFull = errors.New("upstream long polls at their cap")

// errFlightsShare: a new distinct flight would take the pod past its fair share of
// the group's cap.
var errFlightsShare = errors.New("upstream long polls at this pod's share of their cap")

// flightCap is a fairCap as a flight group's cap (internal/flight.Cap).
type flightCap struct{ c *fairCap }

func (fc flightCap) Take(k podKey) error {
	switch fc.c.take(k) {
	case capFull:
		return errFlightsFull
	case capOverShare:
		return errFlightsShare
	}
	return nil
}

func (fc flightCap) Give(k podKey) { fc.c.give(k) }
