package altsrelay

// The bytes of one relayed connection: the client's preface and frames through the
// filter (filter.go), the upstream's bytes as they are, both directions counted.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
)

// activity reports every read of n > 0 bytes as traffic.
type activity struct {
	r  io.Reader
	rc *relayed
}

func (a activity) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.rc.touch()
	}
	return n, err
}

// relay checks the client's preface, dials upstream, and then passes frames from the
// client through the filter and bytes from upstream as they are, until both
// directions are done or the filter refuses.
func (r *Relay) relay(rc *relayed) (up, down int64, err error) {
	defer rc.client.Close()
	f := newFilter(activity{rc.client, rc})
	if err := f.preface(); err != nil {
		return 0, 0, r.filterError(rc, err)
	}
	d := net.Dialer{Timeout: r.cfg.DialTimeout}
	upConn, err := d.Dial("tcp", r.cfg.Upstream)
	if err != nil {
		r.metrics.upstreamErrors.Inc()
		r.log.Warn("ALTS relay: upstream unreachable", "upstream", r.cfg.Upstream, "err", err)
		return 0, 0, err
	}
	defer upConn.Close()
	r.mu.Lock()
	rc.upstream = upConn
	// Close ran, or a deadline cut the connection, while dialing: do not start.
	stop := r.closed || rc.state.Load() == stateEnded
	r.mu.Unlock()
	if stop {
		return 0, 0, ErrClosed
	}
	type result struct {
		n   int64
		err error
	}
	toUp, toPod := make(chan result, 1), make(chan result, 1)
	go func() {
		n, err := r.forward(rc, f, upConn)
		toUp <- result{n, err}
	}()
	go func() {
		n, err := copyHalf(rc.client, activity{upConn, rc}, r.metrics.bytesToPod)
		toPod <- result{n, err}
	}()
	var errs []error
	for range 2 {
		select {
		case res := <-toUp:
			up = res.n
			if res.err != nil {
				errs = append(errs, fmt.Errorf("pod to upstream: %w", r.filterError(rc, res.err)))
				// A broken side ends both: closing unblocks the other copy.
				rc.client.Close()
				upConn.Close()
			}
		case res := <-toPod:
			down = res.n
			if res.err != nil {
				errs = append(errs, fmt.Errorf("upstream to pod: %w", res.err))
				rc.client.Close()
				upConn.Close()
			}
		}
	}
	return up, down, errors.Join(errs...)
}

// filterError counts and audits a refusal (once per connection: a deadline may have
// ended it first) and returns err.
func (r *Relay) filterError(rc *relayed, err error) error {
	var rf *refusal
	if errors.As(err, &rf) && rc.end() {
		r.refused(rc, rf)
	}
	return err
}

// forward writes the client's preface upstream, then every frame the filter passes,
// and half-closes upstream at the client's end of stream. Passed frames are written
// together while the client's next frame is already read (a client sends its
// preface, SETTINGS, HEADERS and DATA at once): one write, not one per frame.
func (r *Relay) forward(rc *relayed, f *filter, upConn net.Conn) (int64, error) {
	cw := &countingWriter{w: upConn, c: r.metrics.bytesToUpstream}
	w := bufio.NewWriterSize(cw, 32<<10)
	flush := func() error {
		if f.nextFrameBuffered() {
			return nil
		}
		return w.Flush()
	}
	if _, err := w.WriteString(http2.ClientPreface); err != nil {
		return cw.n, err
	}
	if err := flush(); err != nil {
		return cw.n, err
	}
	for {
		raw, data, err := f.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return cw.n, err
		}
		if _, err := w.Write(raw); err != nil {
			return cw.n, err
		}
		if data > 0 {
			if _, err := io.CopyN(w, f.br, data); err != nil {
				return cw.n, err
			}
		}
		if f.requests == 1 && rc.state.CompareAndSwap(stateHandshaking, stateRelaying) {
			r.log.Debug("ALTS relay: handshaker call passed", "src", rc.src.String(), "namespace", rc.ns, "pod", rc.pod)
		}
		if err := flush(); err != nil {
			return cw.n, err
		}
	}
	if err := w.Flush(); err != nil {
		return cw.n, err
	}
	if hc, ok := upConn.(interface{ CloseWrite() error }); ok {
		if err := hc.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return cw.n, err
		}
	}
	return cw.n, nil
}

// copyHalf copies src to dst and then closes dst's write side, so that the peer sees
// the end of the stream while the other direction goes on (half-close).
func copyHalf(dst net.Conn, src io.Reader, count prometheus.Counter) (int64, error) {
	n, err := io.Copy(&countingWriter{w: dst, c: count}, src)
	if err != nil {
		return n, err
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return n, err
		}
	}
	return n, nil
}

type countingWriter struct {
	w io.Writer
	c prometheus.Counter
	n int64
}

func (cw *countingWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	cw.c.Add(float64(n))
	cw.n += int64(n)
	return n, err
}
