// Package altsrelay is metaconceal-proxy's ALTS relay: a TCP relay from the address
// pods' TCP to metadata port 8080 is DNATed to (169.254.169.252:987 by default, as on
// GKE) to the real metadata server's port 8080, where GCE serves the ALTS handshaker
// that gRPC DirectPath uses.
//
// It carries the ALTS handshaker service and nothing else. The only client of that
// port is gRPC's ALTS handshaker client, which speaks HTTP/2 with prior knowledge
// (h2c) and calls /grpc.gcp.HandshakerService/DoHandshake; so the relay reads the
// client's first bytes and every frame it sends after them (filter.go) and passes a
// connection only while it is that: the HTTP/2 client preface, then frames whose
// every HEADERS, on every stream, is a gRPC call under HandshakerServicePrefix.
// Anything else (HTTP/1.1, TLS, h2c for another path, a non-gRPC request, a later
// stream with a bad path) is closed before the offending bytes reach the server,
// counted in metaconceal_proxy_alts_refused_total{reason} and audited, naming the
// pod, within a per-source audit rate. The server's bytes are passed unchanged.
//
// Frames are inspected as they pass rather than the HTTP/2 connection terminated and
// re-originated: the client's HTTP/2 session (SETTINGS, flow control, PINGs, GOAWAY)
// stays end to end with the server, the relay holds no HTTP/2 state but the HPACK
// decoder and the last stream id, and DATA is streamed through unparsed.
//
// The upstream connection is opened once the client's preface is read (a client that
// sends anything else never causes one), not after the first request: grpc-go waits
// for the server's SETTINGS before it sends its first HEADERS.
//
// Deadlines: a connection must send the preface and its first passed request within
// HandshakeTimeout, and is closed when no byte has moved either way for IdleTimeout.
// Caps: MaxConns in all, MaxPerPod per source address.
//
// Half-closes are propagated both ways (a client that shuts down its write side still
// reads the answer), and Shutdown lets open connections finish within a grace period.
package altsrelay

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
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
	// DefaultHandshakeTimeout bounds the time from accept to the client's first passed
	// request (preface, SETTINGS, HEADERS): a handshaker client sends them at once.
	DefaultHandshakeTimeout = 5 * time.Second
	// DefaultIdleTimeout closes a connection when no byte has moved either way for
	// that long. A handshake's exchange takes milliseconds; gRPC keeps an idle
	// handshaker channel open (and reuses it) but redials after a close.
	DefaultIdleTimeout = 5 * time.Minute
)

// unknownNamespace labels attested connections whose record names no namespace;
// unattributedNamespace the connections the host guard did not attest.
const (
	unknownNamespace      = "unknown"
	unattributedNamespace = "unattributed"
)

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
	// MaxPerPod caps them per attested pod, and for all unattributed connections
	// together (default DefaultMaxPerPod). A connection over
	// a cap is closed at once and counted.
	MaxConns  int
	MaxPerPod int
	// HandshakeTimeout bounds the time from accept to the first passed request
	// (default DefaultHandshakeTimeout); IdleTimeout closes a connection on which no
	// byte moved either way for that long (default DefaultIdleTimeout). Connections
	// closed by either are counted.
	HandshakeTimeout time.Duration
	IdleTimeout      time.Duration
}

// Relay relays TCP connections to Config.Upstream. Safe for concurrent use.
type Relay struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	audit   *auditor

	mu        sync.Mutex
	listeners map[net.Listener]bool
	conns     map[*relayed]bool
	perPod    map[string]int // by relayed.key
	closing   bool           // no new connections (Shutdown or Close ran)
	closed    bool           // open connections are being cut (Close ran)
	wg        sync.WaitGroup
	cut       atomic.Int64
}

type relayed struct {
	client, upstream net.Conn // upstream is set under Relay.mu once dialed
	src              netip.Addr
	ns, pod          string
	key              string // the budget it counts against: the attested pod, or "unattributed"

	start time.Time
	state atomic.Int32 // stateHandshaking, stateRelaying or stateEnded
	// last is when a byte last moved either way, as time since start.
	last atomic.Int64
}

// Connection states: a connection is handshaking until its first request passed the
// filter; ended once the relay decided to close it (refusal, deadline), which
// happens once and is counted once.
const (
	stateHandshaking int32 = iota
	stateRelaying
	stateEnded
)

// touch records that bytes moved.
func (rc *relayed) touch() { rc.last.Store(int64(time.Since(rc.start))) }

// end moves the connection to stateEnded; it reports whether this call did.
func (rc *relayed) end() bool {
	for {
		s := rc.state.Load()
		if s == stateEnded {
			return false
		}
		if rc.state.CompareAndSwap(s, stateEnded) {
			return true
		}
	}
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
	if cfg.HandshakeTimeout < 0 || cfg.IdleTimeout < 0 {
		return nil, fmt.Errorf("altsrelay: negative timeout (handshake %v, idle %v)", cfg.HandshakeTimeout, cfg.IdleTimeout)
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
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
		conns: map[*relayed]bool{}, perPod: map[string]int{},
		audit: newAuditor(log, m.auditDropped.Inc)}, nil
}

// ErrClosed is returned by Serve after Shutdown or Close.
var ErrClosed = errors.New("altsrelay: relay closed")

// Serve accepts connections on ln until Shutdown or Close, relaying each. It returns
// ErrClosed after those, or the accept error that stopped it. Its connections are
// unattributed (the relay's own port); ServeIngress serves the attested port.
func (r *Relay) Serve(ln net.Listener) error { return r.ServeIngress(ln, podindex.Unattributed) }

// ServeIngress is Serve for a listener whose connections all have ingress in: on the
// attested listener (the host guard's rules sent them there, pkg/hostguard) a
// connection counts against the pod its source IP names; everything else counts
// against one budget shared by every unattributed connection.
func (r *Relay) ServeIngress(ln net.Listener, in podindex.Ingress) error {
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
		r.handle(c, in)
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
	case r.perPod[rc.key] >= r.cfg.MaxPerPod:
		return "pod_limit"
	}
	r.conns[rc] = true
	r.perPod[rc.key]++
	r.wg.Add(1)
	return ""
}

func (r *Relay) release(rc *relayed) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, rc)
	if r.perPod[rc.key]--; r.perPod[rc.key] <= 0 {
		delete(r.perPod, rc.key)
	}
	r.wg.Done()
}

func (r *Relay) handle(c net.Conn, in podindex.Ingress) {
	rc := &relayed{client: c, src: sourceOf(c), ns: unattributedNamespace, key: unattributedNamespace, start: time.Now()}
	if in != podindex.Unattributed && r.cfg.Pods != nil && rc.src.IsValid() {
		// A snapshot read: never waits (pkg/podindex).
		if pod, ok := r.cfg.Pods.Lookup(rc.src); ok {
			rc.ns, rc.pod, rc.key = pod.Namespace, pod.Name, "pod "+pod.Namespace+"/"+pod.Name
			if rc.ns == "" {
				rc.ns = unknownNamespace
			}
		}
	}
	if reason := r.admit(rc); reason != "" {
		r.metrics.refused.WithLabelValues(reason).Inc()
		r.audit.refused(rc.key, rc.src, rc.ns, rc.pod, slog.String("reason", reason))
		c.Close()
		return
	}
	r.metrics.connections.WithLabelValues(rc.ns).Inc()
	r.metrics.open.Inc()
	// Deadlines: the first request within HandshakeTimeout, a byte either way within
	// IdleTimeout.
	handshake := time.AfterFunc(r.cfg.HandshakeTimeout, func() {
		if rc.state.CompareAndSwap(stateHandshaking, stateEnded) {
			r.refused(rc, refuse(reasonHandshakeTimeout, "no request within %v", r.cfg.HandshakeTimeout))
			r.cutConn(rc)
		}
	})
	// Armed only once idle is assigned: its function resets it.
	var idle *time.Timer
	idle = time.AfterFunc(math.MaxInt64, func() {
		quiet := time.Since(rc.start) - time.Duration(rc.last.Load())
		if quiet < r.cfg.IdleTimeout {
			idle.Reset(r.cfg.IdleTimeout - quiet)
			return
		}
		if rc.end() {
			r.metrics.idleClosed.Inc()
			r.log.Debug("ALTS relay: idle connection closed", "src", rc.src.String(), "namespace", rc.ns, "pod", rc.pod,
				"idle", quiet.String())
			r.cutConn(rc)
		}
	})
	idle.Reset(r.cfg.IdleTimeout)
	go func() {
		defer r.release(rc)
		defer r.metrics.open.Dec()
		defer handshake.Stop()
		defer idle.Stop()
		up, down, err := r.relay(rc)
		attrs := []any{"src", rc.src.String(), "namespace", rc.ns, "pod", rc.pod,
			"bytes_to_upstream", up, "bytes_to_pod", down, "duration", time.Since(rc.start).String()}
		if err != nil {
			r.log.Debug("ALTS connection ended with an error", append(attrs, "err", err)...)
			return
		}
		r.log.Debug("ALTS connection relayed", attrs...)
	}()
}

// refused counts and audits a connection the filter or a deadline closed.
func (r *Relay) refused(rc *relayed, rf *refusal) {
	r.metrics.refused.WithLabelValues(rf.reason).Inc()
	attrs := []slog.Attr{slog.String("reason", rf.reason), slog.String("detail", rf.detail)}
	if rf.method != "" || rf.path != "" || rf.contentType != "" {
		attrs = append(attrs, slog.String("method", rf.method), slog.String("path", rf.path), slog.String("content_type", rf.contentType))
	}
	r.audit.refused(rc.key, rc.src, rc.ns, rc.pod, attrs...)
}

// cutConn closes both sides of a connection at once.
func (r *Relay) cutConn(rc *relayed) {
	r.mu.Lock()
	up := rc.upstream
	r.mu.Unlock()
	rc.client.Close()
	if up != nil {
		up.Close()
	}
}
