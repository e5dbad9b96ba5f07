// Package altsrelay is metaconceal-proxy's ALTS relay: a plain TCP relay from the
// address pods' TCP to metadata port 8080 is DNATed to (169.254.169.252:987 by
// default, as on GKE) to the real metadata server's port 8080, where GCE serves the
// ALTS handshaker that gRPC DirectPath uses.
//
// Bytes are relayed, never parsed: the handshaker authenticates callers as the node's
// service account, whose access tokens pods already get from the metadata server, so
// relaying adds nothing a pod could not already do; concealing kube-env and identity
// tokens is the HTTP side's job. What the relay adds is accounting: every connection
// is attributed to its pod (the CNI plugin's state records, through the pod index) in
// metrics and, at debug level, in the log; and caps, so that one pod cannot hold every
// connection the node may open.
//
// Half-closes are propagated both ways (a client that shuts down its write side still
// reads the answer), and Shutdown lets open connections finish within a grace period.
package altsrelay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// Defaults for Config's zero values.
const (
	DefaultDialTimeout = 5 * time.Second
	DefaultMaxConns    = 4096
	DefaultMaxPerPod   = 64
)

// unknownNamespace labels connections whose source IP has no state record.
const unknownNamespace = "unknown"

// Pods names the pod behind a source IP; *podindex.Index implements it.
type Pods interface {
	Lookup(ip netip.Addr) (podindex.Pod, bool)
}

// Config configures a Relay.
type Config struct {
	// Upstream is where connections are relayed to, host:port (the metadata server's
	// port 8080).
	Upstream string
	// Pods attributes connections to pods; nil attributes none.
	Pods Pods
	// Log receives one debug line per connection and warnings for upstream failures.
	Log *slog.Logger
	// Registerer receives the relay's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
	// DialTimeout bounds connecting upstream (default DefaultDialTimeout).
	DialTimeout time.Duration
	// MaxConns caps the connections open at once (default DefaultMaxConns);
	// MaxPerPod caps them per source IP (default DefaultMaxPerPod). A connection over
	// a cap is closed at once and counted.
	MaxConns  int
	MaxPerPod int
}

// Relay relays TCP connections to Config.Upstream. Safe for concurrent use.
type Relay struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics

	mu        sync.Mutex
	listeners map[net.Listener]bool
	conns     map[*relayed]bool
	perSource map[netip.Addr]int
	closing   bool // no new connections (Shutdown or Close ran)
	closed    bool // open connections are being cut (Close ran)
	wg        sync.WaitGroup
	cut       atomic.Int64
}

type relayed struct {
	client, upstream net.Conn
	src              netip.Addr
}

// New validates cfg and returns a Relay.
func New(cfg Config) (*Relay, error) {
	host, port, err := net.SplitHostPort(cfg.Upstream)
	if err != nil || host == "" || port == "" {
		return nil, fmt.Errorf("altsrelay: upstream %q: want host:port", cfg.Upstream)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxPerPod <= 0 {
		cfg.MaxPerPod = DefaultMaxPerPod
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	return &Relay{cfg: cfg, log: log, metrics: m, listeners: map[net.Listener]bool{},
		conns: map[*relayed]bool{}, perSource: map[netip.Addr]int{}}, nil
}

// ErrClosed is returned by Serve after Shutdown or Close.
var ErrClosed = errors.New("altsrelay: relay closed")

// Serve accepts connections on ln until Shutdown or Close, relaying each. It returns
// ErrClosed after those, or the accept error that stopped it.
func (r *Relay) Serve(ln net.Listener) error {
	r.mu.Lock()
	if r.closing {
		r.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	r.listeners[ln] = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.listeners, ln)
		r.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			r.mu.Lock()
			closing := r.closing
			r.mu.Unlock()
			if closing {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of file descriptors and the like: wait, as net/http does.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				r.log.Warn("ALTS relay: accept failed; retrying", "err", err, "delay", backoff.String())
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("altsrelay: accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		r.handle(c)
	}
}

func sourceOf(c net.Conn) netip.Addr {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		if a, ok := netip.AddrFromSlice(ta.IP); ok {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// admit registers a connection from src, or says which cap refuses it.
func (r *Relay) admit(rc *relayed) (refused string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.closing:
		return "shutting_down"
	case len(r.conns) >= r.cfg.MaxConns:
		return "node_limit"
	case r.perSource[rc.src] >= r.cfg.MaxPerPod:
		return "pod_limit"
	}
	r.conns[rc] = true
	r.perSource[rc.src]++
	r.wg.Add(1)
	return ""
}

func (r *Relay) release(rc *relayed) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, rc)
	if r.perSource[rc.src]--; r.perSource[rc.src] <= 0 {
		delete(r.perSource, rc.src)
	}
	r.wg.Done()
}

func (r *Relay) handle(c net.Conn) {
	rc := &relayed{client: c, src: sourceOf(c)}
	ns, name := unknownNamespace, ""
	if r.cfg.Pods != nil && rc.src.IsValid() {
		if pod, ok := r.cfg.Pods.Lookup(rc.src); ok {
			ns, name = pod.Namespace, pod.Name
		}
	}
	if reason := r.admit(rc); reason != "" {
		r.metrics.refused.WithLabelValues(reason).Inc()
		r.log.Warn("ALTS relay: connection refused", "reason", reason, "src", rc.src.String(), "namespace", ns, "pod", name)
		c.Close()
		return
	}
	r.metrics.connections.WithLabelValues(ns).Inc()
	r.metrics.open.Inc()
	go func() {
		defer r.release(rc)
		defer r.metrics.open.Dec()
		start := time.Now()
		up, down, err := r.relay(rc)
		attrs := []any{"src", rc.src.String(), "namespace", ns, "pod", name,
			"bytes_to_upstream", up, "bytes_to_pod", down, "duration", time.Since(start).String()}
		if err != nil {
			r.log.Debug("ALTS connection ended with an error", append(attrs, "err", err)...)
			return
		}
		r.log.Debug("ALTS connection relayed", attrs...)
	}()
}

// relay dials upstream and copies both ways until both directions are done.
func (r *Relay) relay(rc *relayed) (up, down int64, err error) {
	defer rc.client.Close()
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
	closed := r.closed // Close ran while dialing: do not start
	r.mu.Unlock()
	if closed {
		return 0, 0, ErrClosed
	}
	type result struct {
		n   int64
		err error
	}
	toUp, toPod := make(chan result, 1), make(chan result, 1)
	go func() {
		n, err := copyHalf(upConn, rc.client, r.metrics.bytesToUpstream)
		toUp <- result{n, err}
	}()
	go func() {
		n, err := copyHalf(rc.client, upConn, r.metrics.bytesToPod)
		toPod <- result{n, err}
	}()
	var errs []error
	for range 2 {
		select {
		case res := <-toUp:
			up = res.n
			if res.err != nil {
				errs = append(errs, fmt.Errorf("pod to upstream: %w", res.err))
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

// copyHalf copies src to dst and then closes dst's write side, so that the peer sees
// the end of the stream while the other direction goes on (half-close).
func copyHalf(dst, src net.Conn, count prometheus.Counter) (int64, error) {
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
}

func (cw *countingWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	cw.c.Add(float64(n))
	return n, err
}

// Open returns how many connections are being relayed.
func (r *Relay) Open() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}

// stopAccepting closes the listeners and refuses new connections.
func (r *Relay) stopAccepting() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closing = true
	for ln := range r.listeners {
		ln.Close()
	}
}

// Shutdown stops accepting and waits for open connections to end, until ctx is done;
// then it closes those still open and returns ctx's error.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.stopAccepting()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		r.Close()
		<-done
		return fmt.Errorf("altsrelay: %d connections cut after the shutdown grace: %w", r.cutCount(), ctx.Err())
	}
}

func (r *Relay) cutCount() int { return int(r.cut.Load()) }

// Close stops accepting and closes every open connection at once.
func (r *Relay) Close() error {
	r.stopAccepting()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for rc := range r.conns {
		r.cut.Add(1)
		rc.client.Close()
		if rc.upstream != nil {
			rc.upstream.Close()
		}
	}
	return nil
}
