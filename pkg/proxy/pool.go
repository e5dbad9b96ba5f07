package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"syscall"
	"time"
)

// connPool is the lean upstream path for ordinary (not long poll) requests: HTTP/1.1
// keep-alive connections kept in a LIFO pool, each request written and its answer
// read by the handler's own goroutine. http.Transport hands every request to two
// goroutines per connection (writeLoop, readLoop); on this path, where answers are
// small and the upstream is one host away, those handoffs cost more than the
// policy, the audit and the metrics together.
//
// Requests are GET or HEAD only (the policy allows nothing else), so a request that
// failed on a reused connection before any answer byte is retried on another one,
// as net/http does for idempotent requests.
type connPool struct {
	addr    string // host:port
	tls     bool
	host    string // for TLS server name
	dialer  net.Dialer
	maxIdle int
	idleFor time.Duration

	mu   sync.Mutex
	idle []*upConn
}

type upConn struct {
	conn     net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	lastUsed time.Time

	// For unsolicited, set up once per connection so the check does not allocate.
	raw     syscall.RawConn // nil for TLS
	peekFn  func(fd uintptr) bool
	peekErr error
	peek    [1]byte
}

func newConnPool(u *url.URL, maxIdle int) *connPool {
	host, port := u.Hostname(), u.Port()
	isTLS := u.Scheme == "https"
	if port == "" {
		port = "80"
		if isTLS {
			port = "443"
		}
	}
	p := &connPool{
		addr:    net.JoinHostPort(host, port),
		tls:     isTLS,
		host:    host,
		dialer:  net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second},
		maxIdle: maxIdle,
		idleFor: 60 * time.Second,
	}
	return p
}

func (p *connPool) get(ctx context.Context) (*upConn, bool, error) {
	now := time.Now()
	p.mu.Lock()
	for len(p.idle) > 0 {
		c := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if now.Sub(c.lastUsed) >= p.idleFor {
			c.conn.Close() // idle too long: the upstream may have dropped it
			continue
		}
		p.mu.Unlock()
		if !c.unsolicited() {
			return c, true, nil
		}
		c.conn.Close()
		p.mu.Lock()
	}
	p.mu.Unlock()
	c, err := p.dial(ctx)
	return c, false, err
}

func (p *connPool) dial(ctx context.Context) (*upConn, error) {
	conn, err := p.dialer.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, err
	}
	if p.tls {
		tc := tls.Client(conn, &tls.Config{ServerName: p.host, MinVersion: tls.VersionTLS12})
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, err
		}
		conn = tc
	}
	c := &upConn{conn: conn, br: bufio.NewReaderSize(conn, 4096), bw: bufio.NewWriterSize(conn, 1024)}
	if sc, ok := conn.(syscall.Conn); ok {
		if c.raw, err = sc.SyscallConn(); err != nil {
			conn.Close()
			return nil, err
		}
		c.peekFn = c.peekIdle
	}
	return c, nil
}

func (p *connPool) put(c *upConn) {
	c.lastUsed = time.Now()
	p.mu.Lock()
	if len(p.idle) < p.maxIdle {
		p.idle = append(p.idle, c)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	c.conn.Close()
}

// closeIdle closes every idle connection.
func (p *connPool) closeIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.conn.Close()
	}
}

// Shared read-only requests for http.ReadResponse, which only looks at the method.
var (
	responseToGET  = &http.Request{Method: http.MethodGet}
	responseToHEAD = &http.Request{Method: http.MethodHead}
)

// longAgo is a deadline in the past: setting it unblocks pending I/O at once.
var longAgo = time.Unix(1, 0)

// send sends req on the pool (the upstream interface, upstream.go). Closing the
// answer's body gives the connection back when the whole body was read, then gives
// back the slot.
func (p *connPool) send(ctx context.Context, req *upstreamRequest, deadline time.Time, slot slots) (*http.Response, error) {
	resp, release, err := p.roundTripSlot(ctx, req, deadline)
	if err != nil {
		return nil, err
	}
	resp.Body = &poolBody{ReadCloser: resp.Body, release: release, slot: slot}
	return resp, nil
}

// CloseIdleConnections closes every idle connection.
func (p *connPool) CloseIdleConnections() { p.closeIdle() }

// poolBody gives its connection back to the pool, and its slot, when closed.
type poolBody struct {
	io.ReadCloser
	release func(reusable bool)
	slot    slots
	done    bool
}

func (b *poolBody) Close() error {
	err := b.ReadCloser.Close()
	if !b.done {
		b.done = true
		b.release(err == nil)
		b.slot.release()
	}
	return err
}

func (p *connPool) roundTripSlot(ctx context.Context, req *upstreamRequest, deadline time.Time) (*http.Response, func(reusable bool), error) {
	for {
		c, reused, err := p.get(ctx)
		if err != nil {
			return nil, nil, err
		}
		if err := c.conn.SetDeadline(deadline); err != nil {
			c.conn.Close()
			return nil, nil, err
		}
		stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(longAgo) })
		resp, err := c.exchange(req)
		if err != nil {
			stop()
			c.conn.Close()
			// Every stale pooled connection is dropped in turn; a new connection
			// (reused == false) is never retried.
			if reused && retryable(err) && ctx.Err() == nil {
				continue
			}
			if ctx.Err() != nil {
				return nil, nil, ctx.Err()
			}
			return nil, nil, err
		}
		release := func(reusable bool) {
			cancelled := !stop()
			if reusable && !cancelled && !resp.Close {
				p.put(c)
				return
			}
			c.conn.Close()
		}
		return resp, release, nil
	}
}

func (c *upConn) exchange(req *upstreamRequest) (*http.Response, error) {
	bw := c.bw
	bw.WriteString(req.method)
	bw.WriteByte(' ')
	writeEscapedPath(bw, req.path)
	if req.rawQuery != "" {
		bw.WriteByte('?')
		bw.WriteString(req.rawQuery)
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(req.host)
	for _, v := range req.flavor {
		bw.WriteString("\r\nMetadata-Flavor: ")
		bw.WriteString(v)
	}
	bw.WriteString("\r\n\r\n")
	if err := bw.Flush(); err != nil {
		return nil, &notAnsweredError{err}
	}
	// An upstream that closed the idle connection shows here, before any answer byte.
	if _, err := c.br.Peek(1); err != nil {
		return nil, &notAnsweredError{err}
	}
	respondTo := responseToGET
	if req.method == http.MethodHead {
		respondTo = responseToHEAD
	}
	// Informational answers (103 Early Hints, an unasked 100 Continue) come before
	// the final one on the same connection: skip them, or the final answer would be
	// left on the pooled connection for the next request, another client's.
	for range maxInformational {
		resp, err := http.ReadResponse(c.br, respondTo)
		if err != nil {
			return nil, err
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return nil, errors.New("upstream answered 101 Switching Protocols to a request that asked for no upgrade")
		case resp.StatusCode >= 100 && resp.StatusCode < 200:
			continue
		}
		return resp, nil
	}
	return nil, fmt.Errorf("upstream sent more than %d informational (1xx) answers", maxInformational)
}

// maxInformational bounds the 1xx answers skipped before a final one.
const maxInformational = 5

// unsolicited reports whether an idle pooled connection holds bytes the upstream
// sent without being asked (a body on HEAD or 304, bytes after a body), or has
// been closed or reset by it. Such a connection is never reused: whatever it holds
// would be read as the answer to the next request, another client's.
func (c *upConn) unsolicited() bool {
	if c.br.Buffered() > 0 {
		return true
	}
	if c.raw == nil {
		return false // TLS: only what is already buffered can be seen
	}
	// The last request's deadline may have passed while the connection sat idle;
	// a passed deadline would fail the peek without looking.
	if err := c.conn.SetReadDeadline(time.Time{}); err != nil {
		return true
	}
	err := c.raw.Read(c.peekFn)
	return err != nil || !errors.Is(c.peekErr, syscall.EAGAIN)
}

// peekIdle peeks at fd without waiting: EAGAIN is the only answer of a clean idle
// connection; data, EOF (n == 0) or an error all rule it out. It always returns
// true, so that RawConn.Read never waits for readability.
func (c *upConn) peekIdle(fd uintptr) bool {
	_, _, c.peekErr = syscall.Recvfrom(int(fd), c.peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	if c.peekErr == nil {
		c.peekErr = io.EOF // data or EOF: either way not reusable
	}
	return true
}

// writeEscapedPath writes a canonical path percent-encoding what a request line may
// not carry raw; the common path needs no encoding and is written as it is.
func writeEscapedPath(bw *bufio.Writer, path string) {
	for i := 0; i < len(path); i++ {
		if !pathSafe(path[i]) {
			bw.WriteString((&url.URL{Path: path}).EscapedPath())
			return
		}
	}
	bw.WriteString(path)
}

func pathSafe(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '/' || c == '-' || c == '.' || c == '_' || c == '~' || c == '@'
}

// notAnsweredError is a failure before any byte of the answer arrived.
type notAnsweredError struct{ err error }

func (e *notAnsweredError) Error() string { return e.err.Error() }
func (e *notAnsweredError) Unwrap() error { return e.err }

// retryable reports errors that mean a reused connection had been closed by the
// upstream before it answered: no answer byte, and the connection closed or reset
// (not a timeout, which a retry would only double).
func retryable(err error) bool {
	var na *notAnsweredError
	if !errors.As(err, &na) {
		return false
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// validHeaderValue rejects values that could split the request we write.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}
