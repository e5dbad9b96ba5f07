package altsrelay

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// pods is a fixed source-IP table standing in for the state dir.
type pods map[netip.Addr]podindex.Pod

func (p pods) Lookup(ip netip.Addr) (podindex.Pod, bool) { pod, ok := p[ip]; return pod, ok }

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
	go func() { done <- r.Serve(ln) }()
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
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	return c.(*net.TCPConn)
}

// exchange writes msg, half-closes and reads the whole answer.
func exchange(t *testing.T, c *net.TCPConn, msg string) string {
	t.Helper()
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
	return string(got)
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

// Bytes go through unchanged both ways, the client's half-close reaches the upstream
// (which answers only after it), and the connection is counted for the pod's namespace.
func TestRelayHalfCloseAndAttribution(t *testing.T) {
	t.Parallel()
	loopback := netip.MustParseAddr("127.0.0.1")
	r, addr, reg := start(t, Config{Upstream: upstreamEcho(t), Pods: pods{loopback: {Namespace: "team-a", Name: "grpc-client"}}})
	msg := strings.Repeat("\x16\x03\x01 client hello ", 4096) // binary-ish, 72 KiB
	if got := exchange(t, dial(t, addr), msg); got != "greeting:"+msg {
		t.Fatalf("answer %d bytes, want %d", len(got), len("greeting:"+msg))
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if got := testutil.ToFloat64(r.metrics.connections.WithLabelValues("team-a")); got != 1 {
		t.Errorf("connections{namespace=team-a} = %v, want 1", got)
	}
	if got := testutil.ToFloat64(r.metrics.bytesToUpstream); got != float64(len(msg)) {
		t.Errorf("bytes to upstream = %v, want %d", got, len(msg))
	}
	if got := testutil.ToFloat64(r.metrics.bytesToPod); got != float64(len("greeting:"+msg)) {
		t.Errorf("bytes to pod = %v, want %d", got, len("greeting:"+msg))
	}
	if got := testutil.ToFloat64(r.metrics.open); got != 0 {
		t.Errorf("open gauge = %v after the connection ended", got)
	}
	if n, err := testutil.GatherAndCount(reg, "metaconceal_proxy_alts_connections_total"); err != nil || n != 1 {
		t.Errorf("registry holds %d connection series (%v), want 1", n, err)
	}
}

func TestRelayUnknownSourceAndUnreachableUpstream(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused
	r, addr, _ := start(t, Config{Upstream: dead})
	c := dial(t, addr)
	if got, err := io.ReadAll(c); err != nil || len(got) != 0 {
		t.Errorf("read %q, %v; want an immediate end of stream", got, err)
	}
	waitFor(t, "the connection to end", func() bool { return r.Open() == 0 })
	if got := testutil.ToFloat64(r.metrics.upstreamErrors); got != 1 {
		t.Errorf("upstream errors = %v, want 1", got)
	}
	if got := testutil.ToFloat64(r.metrics.connections.WithLabelValues(unknownNamespace)); got != 1 {
		t.Errorf("connections{namespace=unknown} = %v, want 1", got)
	}
}

// A pod over its cap gets its connection closed at once; others still get through.
func TestRelayPerPodCap(t *testing.T) {
	t.Parallel()
	hold, err := net.Listen("tcp", "127.0.0.1:0") // accepts and holds connections
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hold.Close() })
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	r, addr, _ := start(t, Config{Upstream: hold.Addr().String(), MaxPerPod: 2})
	dial(t, addr)
	dial(t, addr)
	waitFor(t, "two relayed connections", func() bool { return r.Open() == 2 })
	third := dial(t, addr)
	if _, err := third.Read(make([]byte, 1)); err == nil {
		t.Fatal("third connection of the same pod was relayed")
	}
	if got := testutil.ToFloat64(r.metrics.refused.WithLabelValues("pod_limit")); got != 1 {
		t.Errorf("refused{pod_limit} = %v, want 1", got)
	}
	if r.Open() != 2 {
		t.Errorf("open = %d, want 2", r.Open())
	}
}

// Shutdown waits for open connections within the grace, then cuts them.
func TestRelayShutdownGrace(t *testing.T) {
	t.Parallel()
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hold.Close() })
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	r, addr, _ := start(t, Config{Upstream: hold.Addr().String()})
	c := dial(t, addr)
	waitFor(t, "a relayed connection", func() bool { return r.Open() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	begin := time.Now()
	err = r.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the grace's deadline", err)
	}
	if waited := time.Since(begin); waited < 200*time.Millisecond {
		t.Errorf("Shutdown returned after %v, before the grace ended", waited)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after the grace")
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
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a relayed connection", func() bool { return r.Open() == 1 })
	errc := make(chan error, 1)
	go func() { errc <- r.Shutdown(context.Background()) }()
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if got, _ := io.ReadAll(c); string(got) != "greeting:x" {
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

func TestNewValidates(t *testing.T) {
	t.Parallel()
	for _, up := range []string{"", "169.254.169.254", ":8080", "host:"} {
		if _, err := New(Config{Upstream: up}); err == nil {
			t.Errorf("New accepted upstream %q", up)
		}
	}
}
