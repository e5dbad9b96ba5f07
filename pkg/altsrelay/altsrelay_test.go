package altsrelay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// pods is a fixed source-IP table standing in for the state dir.
type pods map[netip.Addr]podindex.Pod

func (p pods) Lookup(ip netip.Addr) (podindex.Pod, bool) { pod, ok := p[ip]; return pod, ok }

func start(t *testing.T, cfg Config) (*Relay, string, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.ServeIngress(ln, podindex.Attested) }() // loopback plays the attested listener
	t.Cleanup(func() {
		r.Close()
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("Serve returned %v, want ErrClosed", err)
		}
	})
	return r, ln.Addr().String(), reg
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	return dialFrom(t, "127.0.0.1", addr)
}

// dialFrom connects from src, a loopback address standing for a pod's IP.
func dialFrom(t *testing.T, src, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	return c.(*net.TCPConn)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func refusedCount(r *Relay, reason string) float64 {
	return testutil.ToFloat64(r.metrics.refused.WithLabelValues(reason))
}

// The call grpc-go's ALTS handshaker client makes (gRPC over h2c to
// /grpc.gcp.HandshakerService/DoHandshake) gets the handshaker's answer through the
// relay, counted for the pod's namespace.
func TestRelayPassesHandshakerCall(t *testing.T) {
	t.Parallel()
	svc, upLn := standIn(t)
	loopback := netip.MustParseAddr("127.0.0.1")
	r, addr, reg := start(t, Config{Upstream: upLn.Addr().String(), Pods: pods{loopback: {Namespace: "team-a", Name: "grpc-client"}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var d net.Dialer
	got, err := fakegce.ALTSHandshakerCall.Do(ctx, d.DialContext, addr)
	if err != nil || got != fakegce.ALTSHandshakerAnswer {
		t.Fatalf("handshaker call through the relay: %q, %v; want %q", got, err, fakegce.ALTSHandshakerAnswer)
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if seen := svc.ALTSRequests(); len(seen) != 1 || seen[0].Path != fakegce.ALTSHandshakerPath {
		t.Errorf("upstream saw %v, want the one handshaker call", seen)
	}
	if got := testutil.ToFloat64(r.metrics.connections.WithLabelValues("team-a")); got != 1 {
		t.Errorf("connections{namespace=team-a} = %v, want 1", got)
	}
	if up, down := testutil.ToFloat64(r.metrics.bytesToUpstream), testutil.ToFloat64(r.metrics.bytesToPod); up == 0 || down == 0 {
		t.Errorf("bytes to upstream %v, to pod %v: want both counted", up, down)
	}
	if got := testutil.ToFloat64(r.metrics.open); got != 0 {
		t.Errorf("open gauge = %v after the connection ended", got)
	}
	if n, err := testutil.GatherAndCount(reg, "metaconceal_proxy_alts_connections_total"); err != nil || n != 1 {
		t.Errorf("registry holds %d connection series (%v), want 1", n, err)
	}
}

// rawCodec passes messages as bytes, so that grpc-go needs no generated code.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

// grpc-go itself, as its ALTS handshaker client uses it: a bidirectional stream to
// DoHandshake over h2c, several messages each way on one stream, on a channel that
// waits for the server's SETTINGS before its first request, sends its own PINGs and
// WINDOW_UPDATEs, and carries a second call on the same connection.
func TestRelayGRPCGoClient(t *testing.T) {
	t.Parallel()
	svc, upLn := standIn(t)
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String()})
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for call := range 2 {
		stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
			fakegce.ALTSHandshakerPath, grpc.ForceCodec(rawCodec{}))
		if err != nil {
			t.Fatalf("call %d: %v", call, err)
		}
		for i := range 3 {
			msg := []byte(fmt.Sprintf("frame %d.%d", call, i))
			if err := stream.SendMsg(&msg); err != nil {
				t.Fatalf("call %d send %d: %v", call, i, err)
			}
			var got []byte
			if err := stream.RecvMsg(&got); err != nil {
				t.Fatalf("call %d receive %d: %v", call, i, err)
			}
			if want := fakegce.ALTSGreeting + ": " + string(msg); string(got) != want {
				t.Errorf("call %d answer %d %q, want %q", call, i, got, want)
			}
		}
		if err := stream.CloseSend(); err != nil {
			t.Fatal(err)
		}
		var rest []byte
		if err := stream.RecvMsg(&rest); !errors.Is(err, io.EOF) {
			t.Errorf("call %d: end of stream %v, want io.EOF (grpc-status 0)", call, err)
		}
	}
	if seen := svc.ALTSRequests(); len(seen) != 2 {
		t.Errorf("upstream saw %v, want the two calls", seen)
	}
	if upLn.n.Load() != 1 || r.Open() != 1 {
		t.Errorf("%d upstream connections, %d relayed: want grpc-go's one channel", upLn.n.Load(), r.Open())
	}
	if got := refusedCount(r, reasonFrame) + refusedCount(r, reasonPath) + refusedCount(r, reasonNotGRPC); got != 0 {
		t.Errorf("%v refusals of grpc-go's own traffic", got)
	}
}

// Anything but a gRPC call to the handshaker service over h2c gets no answer, and the
// server behind the relay never sees it: no request at all, and for what is not
// HTTP/2 not even a connection. Each is counted by its reason.
func TestRelayRefusesEverythingElse(t *testing.T) {
	t.Parallel()
	reasons := map[string]string{ // fakegce.ALTSOtherProbes by name
		"HTTP/1.1 GET /": reasonHTTP1,
		"HTTP/1.1 gRPC-shaped POST to the handshaker path":    reasonHTTP1,
		"h2c gRPC call to another service":                    reasonPath,
		"h2c GET of a metadata path":                          reasonPath,
		"h2c POST to the handshaker path, not gRPC":           reasonNotGRPC,
		"h2c gRPC call with a dot segment out of the service": reasonPath,
	}
	for _, p := range fakegce.ALTSOtherProbes {
		t.Run(p.Name, func(t *testing.T) {
			t.Parallel()
			svc, upLn := standIn(t)
			r, addr, _ := start(t, Config{Upstream: upLn.Addr().String()})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var d net.Dialer
			if got, err := p.Do(ctx, d.DialContext, addr); err == nil || got != "" {
				t.Errorf("answered %q (err %v), want no answer", got, err)
			}
			waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
			if seen := svc.ALTSRequests(); len(seen) != 0 {
				t.Errorf("upstream saw %v", seen)
			}
			if p.HTTP1 && upLn.n.Load() != 0 {
				t.Errorf("HTTP/1.1 opened %d upstream connections", upLn.n.Load())
			}
			if got := refusedCount(r, reasons[p.Name]); got != 1 {
				t.Errorf("refused{%s} = %v, want 1", reasons[p.Name], got)
			}
		})
	}
	raw := []struct {
		name, reason string
		bytes        []byte
	}{
		{"TLS ClientHello", reasonTLS, []byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")},
		{"SSH banner", reasonNotH2, []byte("SSH-2.0-OpenSSH_9.2\r\n")},
		{"preface then PUSH_PROMISE", reasonFrame, append(rawCall()[:len(http2.ClientPreface)+9],
			0, 0, 4, byte(http2.FramePushPromise), 4, 0, 0, 0, 1, 0, 0, 0, 2)},
		{"preface then an extension frame", reasonFrame, append(rawCall(),
			0, 0, 0, 0xfa, 0, 0, 0, 0, 0)},
		{"preface then HEADERS before SETTINGS", reasonFrame, append([]byte(http2.ClientPreface), rawCall(handshakerCall)[len(http2.ClientPreface)+9:]...)},
		{"gRPC call with an uppercase header name", reasonFrame, rawCall(request{method: "POST", path: fakegce.ALTSHandshakerPath,
			contentType: "application/grpc", extra: []hpack.HeaderField{{Name: "X-Bad", Value: "1"}}})},
	}
	for _, tc := range raw {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			svc, upLn := standIn(t)
			r, addr, _ := start(t, Config{Upstream: upLn.Addr().String()})
			c := dial(t, addr)
			if _, err := c.Write(tc.bytes); err != nil {
				t.Fatal(err)
			}
			if err := closedByPeer(c); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
			if seen := svc.ALTSRequests(); len(seen) != 0 {
				t.Errorf("upstream saw %v", seen)
			}
			if got := refusedCount(r, tc.reason); got != 1 {
				t.Errorf("refused{%s} = %v, want 1", tc.reason, got)
			}
		})
	}
}

// Every HEADERS of every stream is checked, not only the first: on a connection whose
// first call passed, a second stream with another path cuts the connection before
// the server sees it.
func TestRelayCutsLaterBadStream(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		second request
		reason string
		frag   int
	}{
		{"other path", request{method: "POST", path: "/grpc.health.v1.Health/Check", contentType: "application/grpc"}, reasonPath, 0},
		{"other path split over CONTINUATION frames", request{method: "GET", path: "/computeMetadata/v1/instance/attributes/kube-env"}, reasonPath, 7},
		{"not gRPC", request{method: "GET", path: fakegce.ALTSHandshakerPath}, reasonNotGRPC, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			svc, upLn := standIn(t)
			r, addr, _ := start(t, Config{Upstream: upLn.Addr().String()})
			h := newH2Conn(t, dial(t, addr))
			if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer {
				t.Fatalf("first call: %q, %v", got, err)
			}
			if err := h.headers(3, tc.second, false, tc.frag); err != nil {
				t.Fatal(err)
			}
			if err := h.fr.WriteData(3, true, fakegce.GRPCMessage("client hello")); err != nil {
				t.Logf("writing the second stream's DATA: %v (the relay may have cut already)", err)
			}
			if got, err := h.answer(3); err == nil {
				t.Fatalf("second stream answered %q", got)
			}
			waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
			if seen := svc.ALTSRequests(); len(seen) != 1 || seen[0].Path != fakegce.ALTSHandshakerPath {
				t.Errorf("upstream saw %v, want only the first call", seen)
			}
			if got := refusedCount(r, tc.reason); got != 1 {
				t.Errorf("refused{%s} = %v, want 1", tc.reason, got)
			}
		})
	}
}

// The filter never changes a byte: the server gets exactly what the client sent, the
// client's half-close reaches it (it answers only after that), and its answer, which
// the relay does not parse, comes back whole.
func TestRelayHalfCloseBytesUnchanged(t *testing.T) {
	t.Parallel()
	r, addr, _ := start(t, Config{Upstream: upstreamEcho(t)})
	var b bytes.Buffer
	h := newH2Frames(&b)
	if err := h.preface(); err != nil {
		t.Fatal(err)
	}
	if err := h.headers(1, handshakerCall, false, 0); err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("\x16\x03\x01 client hello ", 4096) // 72 KiB over several DATA frames, one larger than 16 KiB
	if err := h.fr.WriteData(1, false, fakegce.GRPCMessage(big[:10000])); err != nil {
		t.Fatal(err)
	}
	if err := h.fr.WriteData(1, true, []byte(big[10000:])); err != nil {
		t.Fatal(err)
	}
	msg := b.String()
	c := dial(t, addr)
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	if string(got) != "greeting:"+msg {
		t.Fatalf("answer %d bytes, want %d", len(got), len("greeting:"+msg))
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if got := testutil.ToFloat64(r.metrics.bytesToUpstream); got != float64(len(msg)) {
		t.Errorf("bytes to upstream = %v, want %d", got, len(msg))
	}
}

// upstreamEcho reads its client to the end (so it needs the relay to pass on the
// client's half-close), then answers "greeting:" and what it read, and closes.
func upstreamEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				got, _ := io.ReadAll(c)
				_, _ = c.Write(append([]byte("greeting:"), got...))
			}()
		}
	}()
	return ln.Addr().String()
}

// A connection that has not made its first request within the handshake timeout is
// closed and counted: one that sends nothing, one that stops inside the preface, one
// that sends the preface and SETTINGS and waits.
func TestRelayHandshakeTimeout(t *testing.T) {
	t.Parallel()
	_, upLn := standIn(t)
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String(), HandshakeTimeout: 200 * time.Millisecond})
	for _, first := range [][]byte{nil, []byte(http2.ClientPreface[:10]), rawCall()} {
		c := dial(t, addr)
		if _, err := c.Write(first); err != nil {
			t.Fatal(err)
		}
		if err := closedByPeer(c); err != nil {
			t.Fatalf("after %q: %v", first, err)
		}
	}
	waitFor(t, "the connections to end", func() bool { return r.Open() == 0 })
	if got := refusedCount(r, reasonHandshakeTimeout); got != 3 {
		t.Errorf("refused{handshake_timeout} = %v, want 3", got)
	}
}

// A connection on which no byte moves either way for the idle timeout is closed and
// counted, after a call passed on it.
func TestRelayIdleTimeout(t *testing.T) {
	t.Parallel()
	_, upLn := standIn(t)
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String(), IdleTimeout: 300 * time.Millisecond})
	c := dial(t, addr)
	h := newH2Conn(t, c)
	if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer {
		t.Fatalf("call: %q, %v", got, err)
	}
	if err := closedByPeer(c); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if got := testutil.ToFloat64(r.metrics.idleClosed); got != 1 {
		t.Errorf("idle closed = %v, want 1", got)
	}
	if got := refusedCount(r, reasonHandshakeTimeout); got != 0 {
		t.Errorf("refused{handshake_timeout} = %v, want 0", got)
	}
}

// A pod holding its maximum of relayed connections, each past its first call, gets
// its next one refused; another pod's handshake is still relayed.
func TestRelayPerPodCapOtherPodServed(t *testing.T) {
	t.Parallel()
	svc, upLn := standIn(t)
	podA, podB := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String(), MaxPerPod: 2,
		Pods: pods{podA: {Namespace: "team-a", Name: "hog"}, podB: {Namespace: "team-b", Name: "grpc-client"}}})
	for i := range 2 {
		h := newH2Conn(t, dialFrom(t, podA.String(), addr))
		if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer { // and keeps the connection
			t.Fatalf("pod A connection %d: %q, %v", i, got, err)
		}
	}
	if err := closedByPeer(dialFrom(t, podA.String(), addr)); err != nil {
		t.Fatalf("pod A's third connection: %v", err)
	}
	if got := refusedCount(r, "pod_limit"); got != 1 {
		t.Errorf("refused{pod_limit} = %v, want 1", got)
	}
	h := newH2Conn(t, dialFrom(t, podB.String(), addr))
	if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer {
		t.Fatalf("pod B's handshake while pod A holds its maximum: %q, %v", got, err)
	}
	if seen := svc.ALTSRequests(); len(seen) != 3 {
		t.Errorf("upstream saw %d calls, want 3", len(seen))
	}
	if r.Open() != 3 {
		t.Errorf("open = %d, want 3", r.Open())
	}
}

// Connections on the relay's own port are unattributed, whatever their source: two
// addresses (one of them a recorded pod's, as a forger would use it) share one
// MaxPerPod budget, so a third address is refused, while an attested pod's handshake
// is still relayed. Per source IP, as before issue 17, the third would be served.
func TestRelayUnattributedShareOneBudget(t *testing.T) {
	t.Parallel()
	_, upLn := standIn(t)
	podA, podB := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String(), MaxPerPod: 2,
		Pods: pods{podA: {Namespace: "team-a", Name: "victim"}, podB: {Namespace: "team-b", Name: "grpc-client"}}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = r.Serve(ln) }() // ends with the relay's Close
	unattributed := ln.Addr().String()
	for _, src := range []string{"127.0.0.1", "127.0.0.3"} {
		h := newH2Conn(t, dialFrom(t, src, unattributed))
		if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer {
			t.Fatalf("unattributed connection from %s: %q, %v", src, got, err)
		}
	}
	if err := closedByPeer(dialFrom(t, "127.0.0.4", unattributed)); err != nil {
		t.Fatalf("a third unattributed address: %v; want refused (one shared budget)", err)
	}
	if got := refusedCount(r, "pod_limit"); got != 1 {
		t.Errorf("refused{pod_limit} = %v, want 1", got)
	}
	if got := testutil.ToFloat64(r.metrics.connections.WithLabelValues(unattributedNamespace)); got != 2 {
		t.Errorf("connections{namespace=unattributed} = %v, want 2", got)
	}
	h := newH2Conn(t, dialFrom(t, podB.String(), addr))
	if got, err := h.exchange(1); err != nil || got != fakegce.ALTSHandshakerAnswer {
		t.Fatalf("attested pod B's handshake while the unattributed budget is full: %q, %v", got, err)
	}
}

// Refusals are audited, naming the pod, within the source's audit rate; the rest are
// counted and reported with the next line.
func TestRelayAuditLines(t *testing.T) {
	t.Parallel()
	_, upLn := standIn(t)
	var logs syncBuffer
	loopback := netip.MustParseAddr("127.0.0.1")
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String(), Log: slog.New(slog.NewTextHandler(&logs, nil)),
		Pods: pods{loopback: {Namespace: "team-a", Name: "curious"}}})
	for range auditBurst + 5 {
		c := dial(t, addr)
		if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		if err := closedByPeer(c); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the connections to end", func() bool { return r.Open() == 0 })
	lines := strings.Count(logs.String(), "ALTS relay: connection refused")
	if lines < auditBurst || lines >= auditBurst+5 {
		t.Errorf("%d audit lines for %d refusals, want the burst (%d) and a few", lines, auditBurst+5, auditBurst)
	}
	if !strings.Contains(logs.String(), "reason=http1") || !strings.Contains(logs.String(), "pod_namespace=team-a pod_name=curious source_ip=127.0.0.1") {
		t.Errorf("audit lines lack the reason or the pod:\n%s", logs.String())
	}
	if got := testutil.ToFloat64(r.metrics.auditDropped); got == 0 || int(got)+lines != auditBurst+5 {
		t.Errorf("audit lines dropped = %v with %d written, want them to add up to %d", got, lines, auditBurst+5)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// holdCall opens a relayed connection whose call stays open.
func holdCall(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c := dial(t, addr)
	h := newH2Conn(t, c)
	if err := h.headers(1, handshakerCall, false, 0); err != nil {
		t.Fatal(err)
	}
	return c
}

// Shutdown waits for open connections within the grace, then cuts them.
func TestRelayShutdownGrace(t *testing.T) {
	t.Parallel()
	_, upLn := standIn(t)
	r, addr, _ := start(t, Config{Upstream: upLn.Addr().String()})
	c := holdCall(t, addr)
	waitFor(t, "a relayed call", func() bool { return r.Open() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := r.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the grace's deadline", err)
	}
	if err := closedByPeer(c); err != nil {
		t.Errorf("connection after the grace: %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("relay still accepts after Shutdown")
	}
}

// Shutdown returns as soon as the last connection ended by itself.
func TestRelayShutdownDrains(t *testing.T) {
	t.Parallel()
	r, addr, _ := start(t, Config{Upstream: upstreamEcho(t)})
	c := dial(t, addr)
	msg := rawCall(handshakerCall)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a relayed connection", func() bool { return r.Open() == 1 })
	errc := make(chan error, 1)
	go func() { errc <- r.Shutdown(context.Background()) }()
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, _ := io.ReadAll(c); string(got) != "greeting:"+string(msg) {
		t.Errorf("answer during shutdown %q", got)
	}
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Shutdown = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last connection ended")
	}
}

func TestRelayUnreachableUpstream(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused
	r, addr, _ := start(t, Config{Upstream: dead})
	c := dial(t, addr)
	if _, err := c.Write(rawCall()); err != nil {
		t.Fatal(err)
	}
	if err := closedByPeer(c); err != nil {
		t.Error(err)
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if got := testutil.ToFloat64(r.metrics.upstreamErrors); got != 1 {
		t.Errorf("upstream errors = %v, want 1", got)
	}
	if got := testutil.ToFloat64(r.metrics.connections.WithLabelValues(unattributedNamespace)); got != 1 {
		t.Errorf("connections{namespace=unattributed} (no pods known) = %v, want 1", got)
	}
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	for _, up := range []string{"", "169.254.169.254", ":8080", "host:"} {
		if _, err := New(Config{Upstream: up}); err == nil {
			t.Errorf("New accepted upstream %q", up)
		}
	}
	for _, cfg := range []Config{{HandshakeTimeout: -time.Second}, {IdleTimeout: -time.Second}} {
		cfg.Upstream = "127.0.0.1:8080"
		if _, err := New(cfg); err == nil {
			t.Errorf("New accepted %+v", cfg)
		}
	}
}
