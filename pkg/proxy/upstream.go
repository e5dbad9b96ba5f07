package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"
)

// Ordinary requests go upstream through one interface, upstream, with two
// implementations: the hand-written keep-alive pool (pool.go), the default, which
// answers 1.6x what net/http's Transport does with the cache off and cold keys
// (measured side by side, docs/figures.md), and any http.RoundTripper
// (Config.Ordinary; net/http's Transport). Long polls and readiness checks use
// Config.Transport. What the answer stage adds around the interface is here: the canonical request (built from a
// reqKey or a decision, never from the client's raw target), the upstream timeout,
// the latency metric, and the slots that cap the ordinary requests in flight
// (--max-upstream-conns).

// upstreamRequest is an ordinary request to send: everything is already canonical.
type upstreamRequest struct {
	method, host, path, rawQuery string
	flavor                       []string
}

// errUpstreamBusy: no upstream slot came free in time.
var errUpstreamBusy = errors.New("every upstream slot (the cap on ordinary requests in flight) stayed busy")

// upstreamSlotWait bounds the wait for an upstream slot: when every slot stays busy
// that long the upstream is overloaded, and a quick 503 with Retry-After serves the
// client better than a wait to its deadline.
const upstreamSlotWait = time.Second

// slots caps the ordinary requests in flight upstream; a nil slots is no cap.
type slots chan struct{}

func newSlots(n int) slots {
	if n <= 0 {
		return nil
	}
	return make(slots, n)
}

// acquire takes a slot, waiting until ctx ends, deadline passes or upstreamSlotWait.
func (s slots) acquire(ctx context.Context, deadline time.Time) error {
	if s == nil {
		return nil
	}
	select {
	case s <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTimer(min(time.Until(deadline), upstreamSlotWait))
	defer t.Stop()
	select {
	case s <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return errUpstreamBusy
	}
}

func (s slots) release() {
	if s != nil {
		<-s
	}
}

// upstream sends one ordinary request by the deadline. Closing the answer's body
// gives back the connection (when read whole) and then slot.
type upstream interface {
	send(ctx context.Context, req *upstreamRequest, deadline time.Time, slot slots) (*http.Response, error)
}

// roundTripper is an http.RoundTripper as the upstream (Config.Ordinary).
type roundTripper struct {
	rt                   http.RoundTripper
	upstreamScheme, host string
}

func (u roundTripper) send(ctx context.Context, req *upstreamRequest, deadline time.Time, slot slots) (*http.Response, error) {
	ctx, cancel := context.WithDeadline(ctx, deadline)
	out, _ := http.NewRequestWithContext(ctx, req.method, "", nil) // "" cannot fail to parse
	out.URL.Scheme = u.upstreamScheme
	out.URL.Host = u.host
	out.URL.Path = req.path
	out.URL.RawQuery = req.rawQuery
	out.Host = req.host
	if req.flavor != nil {
		out.Header["Metadata-Flavor"] = req.flavor
	}
	resp, err := u.rt.RoundTrip(out)
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &sentBody{ReadCloser: resp.Body, done: func() { cancel(); slot.release() }}
	return resp, nil
}

// send sends req upstream within a slot and the upstream timeout, and observes the
// upstream's latency. Closing the answer's body gives back the slot (and, read
// whole, the connection).
func (a *answerer) send(ctx context.Context, req *upstreamRequest) (*http.Response, error) {
	start := time.Now()
	deadline := start.Add(a.upstreamTimeout)
	if err := a.slots.acquire(ctx, deadline); err != nil {
		return nil, err
	}
	resp, err := a.upstream.send(ctx, req, deadline, a.slots)
	if err != nil {
		a.slots.release()
		return nil, err
	}
	a.metrics.latencyRequest.Observe(time.Since(start).Seconds())
	return resp, nil
}

// sentBody calls done once, when the answer's body is closed.
type sentBody struct {
	io.ReadCloser
	done   func()
	closed bool
}

func (b *sentBody) Close() error {
	err := b.ReadCloser.Close()
	if !b.closed {
		b.closed = true
		b.done()
	}
	return err
}

// closeIdle closes the upstream's idle connections, when it keeps any.
func (a *answerer) closeIdle() {
	for _, rt := range []any{a.upstream, a.transport} {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}
}

// CloseIdleConnections closes the round tripper's idle connections, when it keeps any.
func (u roundTripper) CloseIdleConnections() {
	if c, ok := u.rt.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}
