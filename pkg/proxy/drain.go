package proxy

// STAND-IN for the "pipeline" branch's Handler.Drain (issue 18, part 1): the lead keeps
// that one at merge and deletes this file. It only touches the long-poll machinery
// through flightGroup's lock and the existing deliver/fetchWhole/rawResponse.

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"
)

// drainSweep is how often Drain hands back polls that parked after it was called.
const drainSweep = 100 * time.Millisecond

// sweepers marks the handlers whose background hand-back runs (one each).
var sweepers sync.Map // *Handler -> struct{}

// Drain hands every parked long poll back to its client and returns once those answers
// are written: the client gets what GCE answers when timeout_sec runs out, the current
// value and its ETag, and polls again, on the next instance; never an error unless the
// upstream fails. Until Close, polls that park later are handed back every 100 ms.
// Calling it again hands back (and waits for) what parked meanwhile.
func (h *Handler) Drain() {
	h.log.Info("draining: handing parked long polls back")
	h.handBack()
	if _, running := sweepers.LoadOrStore(h, struct{}{}); running {
		return
	}
	go func() {
		defer sweepers.Delete(h)
		t := time.NewTicker(drainSweep)
		defer t.Stop()
		for {
			select {
			case <-h.baseCtx.Done():
				return
			case <-t.C:
				h.handBack()
			}
		}
	}()
}

// handBack takes every parked client off its flight, answers it with the current
// value of what it polls, and returns once every answer is written.
func (h *Handler) handBack() {
	g := h.polls
	byKey := map[reqKey][]*parkedPoll{}
	g.mu.Lock()
	for key, f := range g.flights {
		for p := range f.parked {
			delete(f.parked, p)
			byKey[key] = append(byKey[key], p)
			g.leaveLocked(key, f) // the last one cancels the upstream poll
		}
	}
	g.mu.Unlock()
	var wg sync.WaitGroup
	for key, parked := range byKey {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.answerNow(key, parked)
		}()
	}
	wg.Wait()
}

// answerNow fetches the current value for a long poll's key (without wait_for_change,
// last_etag and timeout_sec) and writes it to the clients parked on it.
func (h *Handler) answerNow(key reqKey, parked []*parkedPoll) {
	now := key
	var kept []string
	for _, kv := range strings.Split(key.query, "&") {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "wait_for_change", "last_etag", "timeout_sec", "":
			continue
		}
		kept = append(kept, kv)
	}
	now.query = strings.Join(kept, "&")
	ctx, cancel := context.WithTimeout(context.Background(), h.upstreamTimeout)
	defer cancel()
	headOnly := key.flags&keyHead != 0
	status, hdr, body, err := h.fetchWhole(h.newUpstreamRequest(ctx, now), now.path, now.flags&keyFiltered != 0)
	if err != nil {
		st, msg := h.failureAnswer(err, h.upstreamTimeout)
		hdr = http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle}
		status, body = st, []byte(msg)
	}
	h.deliver(parked, rawResponse(status, hdr, body, headOnly))
}
