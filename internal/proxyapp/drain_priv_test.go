package proxyapp

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// probeReady asks an instance's own probe socket for /readyz.
func probeReady(socket string) (int, string, error) {
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}}}
	resp, err := c.Get("http://probe/readyz")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// instance is one proxy of a rolling update, running in the simulated node.
type instance struct {
	socket string
	cancel context.CancelFunc
	done   chan error
}

func startInstance(t *testing.T, node *simnode.Node, listen netip.AddrPort, upstream *url.URL) *instance {
	t.Helper()
	o := valid(t)
	o.Listen = []netip.AddrPort{listen}
	o.ALTS.Listen = nil
	o.Upstream = upstream
	o.Limits = proxy.Limits{} // one client asks every few ms
	o.MetricsListen = "127.0.0.1:1989"
	o.ProbeSocket = filepath.Join(t.TempDir(), "probe.sock")
	o.ProcSys = "/proc/sys" // opened on Run's thread, in the node
	o.ShutdownGrace = 5 * time.Second
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{socket: o.ProbeSocket, cancel: cancel, done: make(chan error, 1)}
	// Run's own goroutine stays in the node, so its listeners are the node's; the
	// upstream is on the machine's loopback (dialled from other threads): no packet
	// leaves loopback anywhere.
	go func() { in.done <- simnode.In(node.Path, func() error { return a.Run(ctx) }) }()
	t.Cleanup(func() { cancel(); <-in.done })
	for {
		code, _, err := probeReady(in.socket)
		if err == nil && code == http.StatusOK {
			return in
		}
		select {
		case err := <-in.done:
			t.Fatalf("instance ended before it was ready: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A rolling update in a simulated node: a second proxy binds beside the first
// (SO_REUSEPORT), goes ready on its own probe socket, and the first one drains while a
// client opens a new connection every 5 ms and a keep-alive client asks every 5 ms: no
// request fails, the held long poll is handed back with an answer (200, the current
// value), never an error, and the old instance's Run returns nil.
func TestRollingUpdateNoFailedRequest(t *testing.T) {
	testutil.RequirePrivileged(t, "ip")
	node, err := simnode.New("drain")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })
	gce := fakegce.New()
	up := httptest.NewServer(gce)
	t.Cleanup(up.Close)
	upstream := &url.URL{Scheme: "http", Host: up.Listener.Addr().String()}
	listen := netip.MustParseAddrPort("127.0.0.1:1988")

	old := startInstance(t, node, listen, upstream)
	base := "http://" + listen.String() + "/computeMetadata/v1/project/project-id"

	// The held long poll, on the old instance (the only one yet).
	type answer struct {
		status int
		body   string
		etag   string
		err    error
	}
	polled := make(chan answer, 1)
	go func() {
		// As Google's client libraries do: the value and its ETag, then a poll for a
		// change from that ETag, on one keep-alive client.
		c := &http.Client{Transport: &http.Transport{DialContext: simnode.DialContextIn(node.Path)}}
		get := func(url string) answer {
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			req.Header.Set("Metadata-Flavor", "Google")
			resp, err := c.Do(req)
			if err != nil {
				return answer{err: err}
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return answer{status: resp.StatusCode, body: string(b), etag: resp.Header.Get("ETag")}
		}
		first := get(base)
		if first.err != nil || first.etag == "" {
			polled <- answer{err: fmt.Errorf("the first GET: %+v", first)}
			return
		}
		polled <- get(base + "?wait_for_change=true&timeout_sec=300&last_etag=" + first.etag)
	}()
	for gce.Waiting() == 0 {
		time.Sleep(10 * time.Millisecond)
	}

	cur := startInstance(t, node, listen, upstream)

	var (
		stop     atomic.Bool
		requests atomic.Int64
		mu       sync.Mutex
		failures []string
		wg       sync.WaitGroup
	)
	client := func(keepAlive bool) {
		defer wg.Done()
		tr := &http.Transport{DialContext: simnode.DialContextIn(node.Path), DisableKeepAlives: !keepAlive}
		defer tr.CloseIdleConnections()
		c := &http.Client{Transport: tr, Timeout: 3 * time.Second}
		for !stop.Load() {
			req, _ := http.NewRequest(http.MethodGet, base, nil)
			req.Header.Set("Metadata-Flavor", "Google")
			resp, err := c.Do(req)
			requests.Add(1)
			var b []byte
			if err == nil {
				b, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
			if err != nil || resp.StatusCode != http.StatusOK || string(b) != "fake-project" {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("keep-alive=%v: %v %q", keepAlive, err, b))
				mu.Unlock()
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	wg.Add(2)
	go client(false)
	go client(true)
	time.Sleep(300 * time.Millisecond)
	old.cancel()
	if err := <-old.done; err != nil {
		t.Errorf("old instance's Run = %v, want nil", err)
	}
	old.done <- nil // for its cleanup
	time.Sleep(300 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	a := <-polled
	if a.err != nil || a.status != http.StatusOK || a.body != "fake-project" {
		t.Errorf("held long poll got %d %q, %v; want 200 with the current value", a.status, a.body, a.err)
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed during the update, e.g. %s", len(failures), requests.Load(), strings.Join(failures[:min(3, len(failures))], "; "))
	}
	if code, body, err := probeReady(cur.socket); err != nil || code != http.StatusOK {
		t.Errorf("new instance /readyz after the update: %d %q %v", code, body, err)
	}
	t.Logf("%d requests, none failed: %v", requests.Load(), len(failures) == 0)
}
