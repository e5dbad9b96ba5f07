package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Every answer the proxy makes itself, rather than relay from the upstream, is
// written here: concealed and denied (403), refused by a limit (429, 503), a body
// refused (403, connection closed), an upstream failure (502, 503, 504) and a
// listing withheld (502). Each carries Metadata-Flavor: Google and a plain-text body
// that says what happened.

// Header values shared by every response; the server only reads them.
var (
	hdrGoogle    = []string{"Google"}
	hdrTextPlain = []string{"text/plain; charset=utf-8"}
	hdrNoSniff   = []string{"nosniff"}
)

// Bodies of the proxy's own failure answers.
const (
	bodyShuttingDown = "metaconceal: the proxy is shutting down; retry.\n"
	bodyCancelled    = "metaconceal: the request was cancelled.\n"
	bodyWithheld     = "metaconceal: the metadata server's recursive listing could not be filtered and was withheld.\n"
	bodyRequestBody  = "Request denied by metaconceal rule request-body: GET and HEAD carry no body.\n"
)

// writeGrace bounds writing one answer: a client that does not read it in time
// loses its connection instead of pinning it.
const writeGrace = 10 * time.Second

type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

// responder writes the proxy's own answers (see above) and counts upstream failures.
type responder struct {
	metrics     *Metrics
	log         *slog.Logger
	closing     context.Context // done once the handler is closed
	releaseConn func(*connInfo) // gives back a connection hijacked to refuse a body
}

// blocked answers a concealed or denied request (x.d): 403 with the reason.
func (s *responder) blocked(x *exchange) {
	body := policy.ConcealedBody
	if x.d.Verdict == policy.Deny {
		body = x.d.Reason()
	}
	hdr := x.w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["X-Content-Type-Options"] = hdrNoSniff
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	x.w.WriteHeader(http.StatusForbidden)
	if !x.head() {
		_, _ = io.WriteString(x.w, body) // a client gone mid-answer is not our error
	}
}

// refused answers a request the limits do not let through: 429 for a pod's own
// limits, 503 for the node-wide ones, always with Retry-After; closeConn closes the
// connection after it.
func (s *responder) refused(x *exchange, reason string, retryAfter int, closeConn bool) {
	x.cl.refused[reason].Inc()
	status := http.StatusTooManyRequests
	body := "metaconceal: too many requests from this pod (" + reason + "); retry after " + strconv.Itoa(retryAfter) + " s.\n"
	if reason == reasonUpstreamLongPolls || reason == reasonUpstreamConns {
		status = http.StatusServiceUnavailable
		body = "metaconceal: the node's metadata proxy is at its upstream limit (" + reason + "); retry after " + strconv.Itoa(retryAfter) + " s.\n"
	}
	hdr := x.w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Retry-After"] = []string{strconv.Itoa(retryAfter)}
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	if closeConn {
		hdr["Connection"] = []string{"close"}
	}
	x.w.WriteHeader(status)
	_, _ = io.WriteString(x.w, body)
}

// refusedConnAnswer is written to a connection over its pod's cap (identity.go).
var refusedConnAnswer = rawResponse(http.StatusTooManyRequests,
	http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle, "Retry-After": {"1"}},
	[]byte("metaconceal: too many connections from this pod ("+reasonPodConns+"); retry after 1 s.\n"), false)

// bodyRefused answers a request that announces a body at once, without reading the
// body, and closes the connection: GET and HEAD carry none, and a body announced but
// never sent would otherwise hold the connection until a read deadline.
func (s *responder) bodyRefused(x *exchange) {
	if hj, ok := x.w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			_ = conn.SetDeadline(time.Now().Add(writeGrace))
			hdr := http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle, "X-Content-Type-Options": hdrNoSniff}
			_, _ = conn.Write(rawResponse(http.StatusForbidden, hdr, []byte(bodyRequestBody), false))
			closeWrite(conn)
			// Read what the client may still send (up to 64 KiB, for a second) before
			// closing: closing with unread data resets the connection, and the client
			// could lose the answer.
			ci := x.conn // not x: the exchange stays on its handler's stack
			go func() {
				_ = conn.SetReadDeadline(time.Now().Add(time.Second))
				_, _ = io.CopyN(io.Discard, conn, 64<<10)
				conn.Close()
				s.releaseConn(ci)
			}()
			return
		}
	}
	hdr := x.w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Connection"] = []string{"close"}
	hdr["Content-Length"] = []string{strconv.Itoa(len(bodyRequestBody))}
	x.w.WriteHeader(http.StatusForbidden)
	_, _ = io.WriteString(x.w, bodyRequestBody)
}

// failed answers 502, 503 or 504 for an upstream error, or nothing when the client
// is already gone (its going away is what cancelled the upstream request).
func (s *responder) failed(x *exchange, err error, limit time.Duration) {
	if x.gone() {
		return
	}
	status, body := s.failure(err, limit)
	writeError(x.w, status, body)
}

// shuttingDown answers 503: the proxy is closing.
func (s *responder) shuttingDown(x *exchange) {
	writeError(x.w, http.StatusServiceUnavailable, bodyShuttingDown)
}

// failure is the status and body for an upstream failure, and counts it. A
// *listingError is a listing withheld.
func (s *responder) failure(err error, limit time.Duration) (int, string) {
	var le *listingError
	var netErr net.Error
	switch {
	case errors.As(err, &le):
		s.metrics.upstreamErrors.WithLabelValues("bad_listing").Inc()
		s.log.Warn("recursive listing withheld: it could not be filtered", "err", err)
		return http.StatusBadGateway, bodyWithheld
	case errors.Is(err, errUpstreamBusy):
		s.metrics.upstreamErrors.WithLabelValues("busy").Inc()
		return http.StatusServiceUnavailable, "metaconceal: " + err.Error() + "; retry.\n"
	case s.closing.Err() != nil:
		return http.StatusServiceUnavailable, bodyShuttingDown
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()):
		s.metrics.upstreamErrors.WithLabelValues("timeout").Inc()
		s.log.Warn("upstream metadata server timed out", "limit", limit, "err", err)
		return http.StatusGatewayTimeout, fmt.Sprintf("metaconceal: the metadata server did not answer within %s.\n", limit)
	}
	s.metrics.upstreamErrors.WithLabelValues("unreachable").Inc()
	s.log.Warn("upstream metadata server unreachable", "err", err)
	return http.StatusBadGateway, "metaconceal: the metadata server is unreachable: " + err.Error() + "\n"
}

// reply is a whole answer read from the upstream (or made from the cache), shared
// read-only by every client of a flight, or the failure that replaces it.
type reply struct {
	status int
	header http.Header
	body   []byte
	// errStatus is non-zero when the upstream failed: the answer is errStatus and
	// errBody (counted and logged once, whoever waits on it).
	errStatus int
	errBody   string
}

// replyOf is the reply for an upstream result: the answer, or when err is set the
// failure's (counted once; nothing counted when nobody waits any more).
func (s *responder) replyOf(status int, hdr http.Header, body []byte, err error, abandoned bool, limit time.Duration) reply {
	switch {
	case err == nil:
		return reply{status: status, header: hdr, body: body}
	case abandoned:
		return reply{errStatus: http.StatusBadGateway, errBody: bodyCancelled}
	}
	st, b := s.failure(err, limit)
	return reply{errStatus: st, errBody: b}
}

// write answers x with rp on its handler goroutine.
func (rp *reply) write(x *exchange) {
	if rp.errStatus != 0 {
		if !x.gone() {
			writeError(x.w, rp.errStatus, rp.errBody)
		}
		return
	}
	dst := x.w.Header()
	for k, v := range rp.header {
		dst[k] = v
	}
	x.w.WriteHeader(rp.status)
	if !x.head() {
		_, _ = x.w.Write(rp.body) // a client gone mid-answer is not our error
	}
}

// raw renders rp as a complete HTTP/1.1 response for a hijacked connection, with
// Connection: close; headOnly: the answer to a HEAD.
func (rp *reply) raw(headOnly bool) []byte {
	if rp.errStatus != 0 {
		hdr := http.Header{"Content-Type": hdrTextPlain, "Metadata-Flavor": hdrGoogle}
		return rawResponse(rp.errStatus, hdr, []byte(rp.errBody), headOnly)
	}
	return rawResponse(rp.status, rp.header, rp.body, headOnly)
}

func writeError(w http.ResponseWriter, status int, body string) {
	hdr := w.Header()
	hdr["Content-Type"] = hdrTextPlain
	hdr["Metadata-Flavor"] = hdrGoogle
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	if status == http.StatusServiceUnavailable {
		hdr["Retry-After"] = []string{"1"}
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

// rawResponse renders a complete HTTP/1.1 response with Connection: close, for an
// answer written on a connection taken over from net/http (parked long polls, refused
// bodies and connections). Hop-by-hop headers in hdr are left out; Content-Length is
// the body's, except in the answer to a HEAD (headOnly), which keeps hdr's and has no
// body.
func rawResponse(status int, hdr http.Header, body []byte, headOnly bool) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	for k, vs := range hdr {
		if hopHeaders[k] || (k == "Content-Length" && !headOnly) {
			continue
		}
		for _, v := range vs {
			b.WriteString(k)
			b.WriteString(": ")
			b.WriteString(v)
			b.WriteString("\r\n")
		}
	}
	if !headOnly {
		b.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n")
	}
	b.WriteString("Connection: close\r\n\r\n")
	if !headOnly {
		b.Write(body)
	}
	return b.Bytes()
}

// withheld answers 502 for a recursive listing that could not be filtered: it is
// never passed on unfiltered.
func (s *responder) withheld(x *exchange, err error) {
	status, body := s.failure(&listingError{err}, 0)
	writeError(x.w, status, body)
}
