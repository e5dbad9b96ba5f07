package proxy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/internal/flight"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// flightGroup and getFlight are the flights of this package: keyed by reqKey,
// charged to a pod, sharing a reply, parking hijacked long polls.
type (
	flightGroup = flight.Group[reqKey, podKey, reply, *parkedPoll]
	getFlight   = flight.Flight[reqKey, podKey, reply, *parkedPoll]
)

// answerer is the answer stage, for allowed requests: a long poll (longpoll.go), a
// listing to filter (listing.go), or an ordinary GET from the cache (cache.go) or
// through a flight (coalesce.go) to the upstream; a HEAD is forwarded on its own.
type answerer struct {
	upstreamScheme, upstreamHost string
	policy                       *policy.Policy    // filters listings
	transport                    http.RoundTripper // long polls, readiness
	upstream                     upstream          // ordinary requests (upstream.go)
	slots                        slots             // ordinary requests in flight (Limits.MaxUpstreamConns)
	upstreamTimeout              time.Duration
	longPollSlack                time.Duration
	podMaxLongPolls              int

	cache   *answerCache
	gets    *flightGroup // ordinary GETs in flight, coalesced (coalesce.go)
	polls   *flightGroup // long polls in flight, coalesced (longpoll.go)
	upShare *fairCap     // pods' fair shares of MaxUpstreamConns (faircap.go)

	metrics     *Metrics
	respond     *responder
	clients     *clients
	releaseConn func(*connInfo)

	closing  context.Context // done once the handler is closed
	drainCtx context.Context // done once Drain was called: parent of poll flights
	drainAll context.CancelFunc
	draining atomic.Bool
}

// answer serves an allowed request.
func (a *answerer) answer(x *exchange) {
	switch {
	case x.d.WaitForChange:
		a.longPoll(x)
	case x.d.FilterListing:
		a.forwardFiltered(x)
	case a.serveGET(x):
		// answered from the cache or through a coalesced upstream GET
	default:
		a.forward(x)
	}
}

// forward serves an ordinary request on its own upstream request (a HEAD, which is
// never coalesced), streaming the answer.
func (a *answerer) forward(x *exchange) {
	if !a.takeUpstream(x) {
		return
	}
	defer a.upShare.give(x.cl.key)
	req := upstreamRequest{method: x.r.Method, host: x.r.Host, path: x.d.Path, rawQuery: x.d.RawQuery, flavor: forwardedFlavor(x.r)}
	if req.host == "" {
		req.host = a.upstreamHost
	}
	resp, err := a.send(x.r.Context(), &req)
	if err != nil {
		a.respond.failed(x, err, a.upstreamTimeout)
		return
	}
	defer resp.Body.Close()
	copyHeader(x.w.Header(), resp.Header)
	x.w.WriteHeader(resp.StatusCode)
	if !x.head() {
		copyBody(x.w, resp)
	}
}

// takeUpstream takes a unit of the pod's share of the upstream requests for a request
// sent on its own (not a coalesced GET, whose flight is charged instead), or answers
// 429 and reports false. The caller gives it back with a.upShare.give(x.cl.key).
func (a *answerer) takeUpstream(x *exchange) bool {
	if a.upShare.take(x.cl.key) != capTaken {
		a.respond.refused(x, reasonShareConns, 1, false)
		return false
	}
	return true
}

// hopHeaders are connection-level headers (RFC 9110 7.6.1) never copied across.
var hopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

// copyHeader copies the upstream's end-to-end headers (Metadata-Flavor, ETag,
// Location, Content-Type, Content-Length, ...) by sharing their value slices: the
// upstream response is ours alone and the server only reads them.
func copyHeader(dst, src http.Header) {
	for k, v := range src {
		if hopHeaders[k] {
			continue
		}
		dst[k] = v
	}
}

// smallBody is the largest answer read whole and written with one Write.
const smallBody = 16 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// copyBody streams the upstream body to the client with a pooled buffer and closes
// it. A body cut short upstream aborts the client connection, so the client sees a
// truncated answer and not a complete-looking wrong one.
func copyBody(w http.ResponseWriter, resp *http.Response) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	if n := resp.ContentLength; n >= 0 && n <= smallBody {
		if n > 0 {
			if _, err := io.ReadFull(resp.Body, buf[:n]); err != nil {
				resp.Body.Close()
				panic(http.ErrAbortHandler)
			}
			_, _ = w.Write(buf[:n]) // a client gone mid-answer is not our error
		}
		resp.Body.Close()
		return
	}
	if _, err := io.CopyBuffer(writerOnly{w}, resp.Body, buf); err != nil {
		resp.Body.Close()
		panic(http.ErrAbortHandler)
	}
	resp.Body.Close()
}

// writerOnly hides the ResponseWriter's ReadFrom so io.CopyBuffer uses our buffer.
type writerOnly struct{ io.Writer }

func readLimited(body io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(body, maxListingBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read upstream answer: %w", err)
	}
	if len(data) > maxListingBytes {
		return nil, fmt.Errorf("upstream answer larger than %d bytes", maxListingBytes)
	}
	return data, nil
}
