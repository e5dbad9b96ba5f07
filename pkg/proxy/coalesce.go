package proxy

import (
	"context"
	"net/http"
	"strconv"
	"time"
)

// Identical concurrent GETs (the same reqKey) share one upstream request, a flight
// of the Handler's gets group (flight.go). The first client runs it on its own
// goroutine; the others wait for its answer. A client that goes away gives back its
// reference, and the last one to go cancels the upstream request. The answer is read
// whole (bounded like a listing), shared read-only by every waiter, and, when the
// cache table says so, kept.

// coalescedGET serves r, from pod who, through the flight for key, starting one if
// none is open and who is within its share of the upstream requests (a flight it
// starts is charged to it until it ends, and so is an answer it caches).
func (h *Handler) coalescedGET(w http.ResponseWriter, r *http.Request, key reqKey, kind cacheKind, who *client) {
	c := h.cache
	f, started, err := h.gets.join(key, h.upstreamTimeout, who.key) // never closed; never full (its cap queues)
	if err != nil {
		h.refuse(w, who, reasonShareConns, 1, false) // errFlightsShare
		return
	}
	if !started {
		c.stats.coalesced.Add(1)
		select {
		case <-f.done:
		case <-r.Context().Done():
			h.gets.leave(key, f)
			return
		}
	} else {
		if kind != notCached {
			// The flight that filled the cache may have ended between the caller's
			// lookup and this join: answer from the cache rather than asking again.
			now := c.now()
			if e := c.get(key); e != nil && now.Before(e.staleAt) {
				c.stats.hits[kind].Add(1)
				e.touch(now)
				hdr, body := e.answer(now)
				h.settle(h.gets, key, f, http.StatusOK, hdr, body, nil)
				h.gets.answered()
				f.write(w, r)
				return
			}
			c.stats.misses[kind].Add(1)
		}
		// The leader runs the flight itself; its client leaving only gives back its
		// reference, and cancels the upstream request if nobody else waits.
		stop := context.AfterFunc(r.Context(), func() { h.gets.leave(key, f) })
		h.runGetFlight(key, f, kind, who.key)
		if !stop() {
			return // the client went away
		}
	}
	f.write(w, r)
}

// runGetFlight sends the flight's request, sets its result, stores a cacheable
// answer charged to pod owner, and reports whether it did.
func (h *Handler) runGetFlight(key reqKey, f *flight, kind cacheKind, owner podKey) bool {
	c := h.cache
	sent := c.now()
	req := key.upstreamRequest()
	status, hdr, body, err := h.fetchGET(f.ctx, &req)
	stored := false
	if err == nil && kind != notCached && status == http.StatusOK {
		stored = c.store(key, kind, hdr, body, sent, owner)
	}
	h.settle(h.gets, key, f, status, hdr, body, err)
	h.gets.answered()
	return stored
}

// fetchGET sends req on the lean pool and reads the whole answer. The header is the
// upstream's end-to-end headers with Content-Length set to the body returned.
func (h *Handler) fetchGET(ctx context.Context, req *upstreamRequest) (int, http.Header, []byte, error) {
	resp, release, err := h.send(ctx, req)
	if err != nil {
		return 0, nil, nil, err
	}
	body, err := readLimited(resp.Body)
	if err != nil {
		resp.Body.Close()
		release(false)
		return 0, nil, nil, err
	}
	release(resp.Body.Close() == nil)
	hdr := make(http.Header, len(resp.Header)+1)
	copyHeader(hdr, resp.Header)
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	return resp.StatusCode, hdr, body, nil
}

// send sends req on the lean pool, within the upstream timeout, and observes the
// upstream's latency.
func (h *Handler) send(ctx context.Context, req *upstreamRequest) (*http.Response, func(reusable bool), error) {
	start := time.Now()
	resp, release, err := h.pool.roundTrip(ctx, req, start.Add(h.upstreamTimeout))
	if err == nil {
		h.metrics.latencyRequest.Observe(time.Since(start).Seconds())
	}
	return resp, release, err
}
