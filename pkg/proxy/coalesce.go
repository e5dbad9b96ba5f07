package proxy

import (
	"context"
	"net/http"
	"strconv"
)

// Identical concurrent GETs (the same reqKey) share one upstream request, a flight
// of the answerer's gets group (internal/flight). The first client runs it on its own
// goroutine; the others wait for its answer. A client that goes away gives back its
// reference, and the last one to go cancels the upstream request. The answer is read
// whole (bounded like a listing), shared read-only by every waiter, and, when the
// cache table says so, kept.

// coalescedGET serves x through the flight for key, starting one if none is open and
// the pod is within its share of the upstream requests (a flight it starts is charged
// to it until it ends, and so is an answer it caches).
func (a *answerer) coalescedGET(x *exchange, key reqKey, kind cacheKind) {
	c := a.cache
	f, started, err := a.gets.Join(key, x.cl.key) // never closed; never full (its cap queues)
	if err != nil {
		a.respond.refused(x, reasonShareConns, 1, false) // errFlightsShare
		return
	}
	if !started {
		c.stats.coalesced.Add(1)
		select {
		case <-f.Done():
		case <-x.r.Context().Done():
			a.gets.Leave(f)
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
				a.gets.Finish(f, func(bool) reply { return reply{status: http.StatusOK, header: hdr, body: body} }, nil)
				rp := f.Result()
				rp.write(x)
				return
			}
			c.stats.misses[kind].Add(1)
		}
		// The leader runs the flight itself; its client leaving only gives back its
		// reference, and cancels the upstream request if nobody else waits.
		stop := context.AfterFunc(x.r.Context(), func() { a.gets.Leave(f) })
		a.runGetFlight(f, kind, x.cl.key)
		if !stop() {
			return // the client went away
		}
	}
	rp := f.Result()
	rp.write(x)
}

// runGetFlight sends the flight's request, finishes it with the answer, stores a
// cacheable answer charged to pod owner, and reports whether it did.
func (a *answerer) runGetFlight(f *getFlight, kind cacheKind, owner podKey) bool {
	c := a.cache
	key := f.Key()
	sent := c.now()
	req := key.upstreamRequest()
	status, hdr, body, err := a.fetchGET(f.Context(), &req)
	stored := false
	if err == nil && kind != notCached && status == http.StatusOK {
		stored = c.store(key, kind, hdr, body, sent, owner)
	}
	a.gets.Finish(f, func(abandoned bool) reply {
		return a.respond.replyOf(status, hdr, body, err, abandoned, a.upstreamTimeout)
	}, nil)
	return stored
}

// fetchGET sends req upstream and reads the whole answer. The header is the
// upstream's end-to-end headers with Content-Length set to the body returned.
func (a *answerer) fetchGET(ctx context.Context, req *upstreamRequest) (int, http.Header, []byte, error) {
	resp, err := a.send(ctx, req)
	if err != nil {
		return 0, nil, nil, err
	}
	body, err := readLimited(resp.Body)
	resp.Body.Close()
	if err != nil {
		return 0, nil, nil, err
	}
	hdr := make(http.Header, len(resp.Header)+1)
	copyHeader(hdr, resp.Header)
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	return resp.StatusCode, hdr, body, nil
}
