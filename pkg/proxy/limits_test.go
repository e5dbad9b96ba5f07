package proxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// twoPods: 127.0.0.1 is team-a/web-0, 127.0.0.2 is team-b/api-0 (127.0.0.0/8 is all
// on lo, so tests can play two pods).
func twoPods(c *Config) {
	c.Pods = fixedPods{
		netip.MustParseAddr("127.0.0.1"): {Namespace: "team-a", Name: "web-0"},
		netip.MustParseAddr("127.0.0.2"): {Namespace: "team-b", Name: "api-0"},
	}
}

// keepAlive is one client connection from a chosen source address.
type keepAlive struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

func dialFrom(t *testing.T, src, base string) *keepAlive {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	conn, err := d.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &keepAlive{t: t, conn: conn, br: bufio.NewReader(conn)}
}

func (k *keepAlive) get(target string) answer {
	k.t.Helper()
	_ = k.conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n", target)
	resp, err := http.ReadResponse(k.br, &http.Request{Method: "GET"})
	if err != nil {
		k.t.Fatalf("GET %s: %v", target, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return answer{resp.StatusCode, resp.Header, string(body), resp.Close}
}

// send writes a request without reading its answer (a long poll to hold).
func (k *keepAlive) send(target string) {
	k.t.Helper()
	fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n", target)
}

func (k *keepAlive) read() answer {
	k.t.Helper()
	_ = k.conn.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(k.br, &http.Request{Method: "GET"})
	if err != nil {
		k.t.Fatalf("read: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return answer{resp.StatusCode, resp.Header, string(body), resp.Close}
}

func wantRefused(t *testing.T, what string, a answer, status int) {
	t.Helper()
	if a.status != status || a.header.Get("Retry-After") == "" || a.header.Get("Metadata-Flavor") != "Google" {
		t.Errorf("%s: %d Retry-After %q %q, want %d with Retry-After", what, a.status, a.header.Get("Retry-After"), a.body, status)
	}
}

func TestPodRateLimit(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		twoPods(c)
		c.Limits = Limits{PodRate: 1, PodBurst: 5}
	})
	a := dialFrom(t, "127.0.0.1", f.proxy.URL)
	for i := range 5 {
		if r := a.get(v1 + "project/project-id"); r.status != 200 {
			t.Fatalf("request %d within the burst: %d %q", i, r.status, r.body)
		}
	}
	r := a.get(v1 + "project/project-id")
	wantRefused(t, "over the burst", r, http.StatusTooManyRequests)
	// The refusal closes the connection: a pod over its rate has to re-dial, and on a
	// node the host guard limits its new connections in the kernel (hostguard/limit.go).
	if !r.close {
		t.Error("a rate refusal kept the connection open")
	}
	// Blocked requests count too: the bucket is per pod, not per verdict.
	wantRefused(t, "kube-env over the burst", dialFrom(t, "127.0.0.1", f.proxy.URL).get(v1+"instance/attributes/kube-env"), http.StatusTooManyRequests)
	// Another connection of the same pod shares its bucket; another pod has its own.
	wantRefused(t, "same pod, new connection", dialFrom(t, "127.0.0.1", f.proxy.URL).get(v1+"project/project-id"), http.StatusTooManyRequests)
	if r := dialFrom(t, "127.0.0.2", f.proxy.URL).get(v1 + "project/project-id"); r.status != 200 {
		t.Errorf("the other pod: %d %q, want 200", r.status, r.body)
	}
	m := scrape(t, f)
	for _, want := range []string{
		`metaconceal_proxy_refused_requests_total{namespace="team-a",reason="pod_rate"} 3`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "refused"))
		}
	}
	if strings.Contains(m, `{namespace="team-b",reason="pod_rate"}`) && !strings.Contains(m, `{namespace="team-b",reason="pod_rate"} 0`) {
		t.Error("the other pod was counted as refused")
	}
}

// With the default limits, a pod's start-up burst (100 requests within a second,
// over a few connections, some of them blocked) is never refused.
func TestStartupBurstNeverRefusedByDefault(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Limits = DefaultLimits })
	var conns []*keepAlive
	for range 4 {
		conns = append(conns, dialFrom(t, "127.0.0.1", f.proxy.URL))
	}
	start := time.Now()
	for i := range 100 {
		target := v1 + "project/project-id"
		if i%10 == 0 {
			target = v1 + "instance/attributes/kube-env"
		}
		if r := conns[i%len(conns)].get(target); r.status == http.StatusTooManyRequests || r.status == http.StatusServiceUnavailable {
			t.Fatalf("request %d of the start-up burst refused: %d %q", i, r.status, r.body)
		}
	}
	t.Logf("100 requests in %s", time.Since(start))
}

func TestPodMaxConns(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		twoPods(c)
		c.Limits = Limits{PodMaxConns: 2}
	})
	a1, a2 := dialFrom(t, "127.0.0.1", f.proxy.URL), dialFrom(t, "127.0.0.1", f.proxy.URL)
	for _, k := range []*keepAlive{a1, a2} {
		if r := k.get(v1 + "project/project-id"); r.status != 200 {
			t.Fatalf("within the cap: %d", r.status)
		}
	}
	r := dialFrom(t, "127.0.0.1", f.proxy.URL).get(v1 + "project/project-id")
	wantRefused(t, "third connection", r, http.StatusTooManyRequests)
	if !r.close {
		t.Error("the connection over the cap was not closed")
	}
	if r := dialFrom(t, "127.0.0.2", f.proxy.URL).get(v1 + "project/project-id"); r.status != 200 {
		t.Errorf("the other pod: %d, want 200", r.status)
	}
	// A connection closed gives its place back.
	a1.conn.Close()
	waitFor(t, "the closed connection given back", func() bool { return f.handler.clientConnsOpen() <= 2 })
	if r := dialFrom(t, "127.0.0.1", f.proxy.URL).get(v1 + "project/project-id"); r.status != 200 {
		t.Errorf("after a close: %d %q, want 200", r.status, r.body)
	}
	if m := scrape(t, f); !strings.Contains(m, `metaconceal_proxy_refused_requests_total{namespace="team-a",reason="pod_conns"} 1`) {
		t.Errorf("pod_conns refusal not counted:\n%s", grepLines(m, "refused"))
	}
}

func TestPodMaxLongPolls(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		twoPods(c)
		c.Limits = Limits{PodMaxLongPolls: 2}
	})
	const attr = "instance/attributes/cluster-name"
	etag := etagOf(t, f.proxy.URL, v1+attr)
	poll := func(sec int) string {
		return fmt.Sprintf("%s%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", v1, attr, etag, sec)
	}
	var held []*keepAlive
	for i := range 2 {
		k := dialFrom(t, "127.0.0.1", f.proxy.URL)
		k.send(poll(30 + i)) // distinct polls: no coalescing
		held = append(held, k)
	}
	waitFor(t, "two polls held", func() bool { return f.fake.Waiting() == 2 })
	wantRefused(t, "third poll", dialFrom(t, "127.0.0.1", f.proxy.URL).get(poll(40)), http.StatusTooManyRequests)
	// Ordinary requests of the same pod still pass; the other pod may poll.
	if r := dialFrom(t, "127.0.0.1", f.proxy.URL).get(v1 + "project/project-id"); r.status != 200 {
		t.Errorf("ordinary request while at the poll cap: %d", r.status)
	}
	other := dialFrom(t, "127.0.0.2", f.proxy.URL)
	other.send(poll(41))
	waitFor(t, "the other pod's poll held", func() bool { return f.fake.Waiting() == 3 })
	// A poll that ends gives its place back.
	held[0].conn.Close()
	waitFor(t, "the closed poll given back", func() bool { return f.fake.Waiting() == 2 })
	k := dialFrom(t, "127.0.0.1", f.proxy.URL)
	k.send(poll(42))
	waitFor(t, "a new poll held", func() bool { return f.fake.Waiting() == 3 })
	f.fake.Set(attr, "changed")
	if r := k.read(); r.status != 200 || r.body != "changed" {
		t.Errorf("poll answer: %d %q", r.status, r.body)
	}
}

func TestMaxUpstreamLongPolls(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		twoPods(c)
		c.Limits = Limits{MaxUpstreamLongPolls: 2} // a share of 1 each, no reserve
	})
	const attr = "instance/attributes/cluster-name"
	etag := etagOf(t, f.proxy.URL, v1+attr)
	poll := func(sec int) string {
		return fmt.Sprintf("%s%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", v1, attr, etag, sec)
	}
	dialFrom(t, "127.0.0.1", f.proxy.URL).send(poll(30))
	dialFrom(t, "127.0.0.2", f.proxy.URL).send(poll(31))
	waitFor(t, "two upstream polls", func() bool { return f.fake.Waiting() == 2 })
	wantRefused(t, "a third distinct poll", dialFrom(t, "127.0.0.3", f.proxy.URL).get(poll(50)), http.StatusServiceUnavailable)
	// An identical poll joins the open one: no new upstream poll needed.
	same := dialFrom(t, "127.0.0.3", f.proxy.URL)
	same.send(poll(30))
	waitFor(t, "the identical poll joined", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_coalesced_total 1")
	})
	f.fake.Set(attr, "v2")
	if r := same.read(); r.status != 200 || r.body != "v2" {
		t.Errorf("coalesced poll: %d %q", r.status, r.body)
	}
	if m := scrape(t, f); !strings.Contains(m, `metaconceal_proxy_refused_requests_total{namespace="unattributed",reason="upstream_long_polls"} 1`) {
		t.Errorf("refusal not counted:\n%s", grepLines(m, "refused"))
	}
}

// Issue 17 part 3: one pod holding as many distinct long polls as it can (from two
// addresses of its own, counted as one pod) cannot stop another pod's distinct long
// poll from being held to its timeout and answered 200. Before the fair share, the
// first pod took every upstream slot and the other was refused 503 at once.
func TestLongPollFairShare(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Pods = fixedPods{
			netip.MustParseAddr("127.0.0.1"): {Namespace: "team-a", Name: "web-0"},
			netip.MustParseAddr("127.0.0.3"): {Namespace: "team-a", Name: "web-0"},
			netip.MustParseAddr("127.0.0.2"): {Namespace: "team-b", Name: "api-0"},
		}
		c.Limits = Limits{MaxUpstreamLongPolls: 16} // no per-pod poll limit: a share of 2
	})
	const attr = "instance/attributes/cluster-name"
	etag := etagOf(t, f.proxy.URL, v1+attr)
	poll := func(sec int) string {
		return fmt.Sprintf("%s%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", v1, attr, etag, sec)
	}
	const flood = 20
	var answered, refused atomic.Int32 // answered at once; of them, 429 with Retry-After
	for i := range flood {
		k := dialFrom(t, []string{"127.0.0.1", "127.0.0.3"}[i%2], f.proxy.URL)
		k.send(poll(100 + i))
		go func() {
			_ = k.conn.SetReadDeadline(time.Now().Add(time.Minute))
			resp, err := http.ReadResponse(k.br, &http.Request{Method: "GET"})
			if err == nil && resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") != "" {
				refused.Add(1)
			}
			answered.Add(1)
		}()
	}
	waitFor(t, "every flood poll held or refused", func() bool { return int(answered.Load())+f.fake.Waiting() == flood })
	if n := refused.Load(); n != flood-2 {
		t.Errorf("%d of the flooding pod's %d polls refused 429, want all but its share of 2", n, flood)
	}
	other := dialFrom(t, "127.0.0.2", f.proxy.URL)
	other.send(poll(2))
	if r := other.read(); r.status != 200 || r.body == "" {
		t.Errorf("the other pod's poll: %d %q, want 200 at its timeout", r.status, r.body)
	}
	if m := scrape(t, f); !strings.Contains(m, fmt.Sprintf(`metaconceal_proxy_refused_requests_total{namespace="team-a",reason="share_upstream_long_polls"} %d`, flood-2)) {
		t.Errorf("refusals not counted:\n%s", grepLines(m, "refused"))
	}
}

// Issue 17 part 3, upstream requests: one pod keeping as many slow requests in flight
// upstream as it can cannot stop another pod's request from being served. Before the
// fair share, the first pod took every upstream slot and the other waited 1 s for
// one, then was refused 503.
func TestUpstreamRequestFairShare(t *testing.T) {
	t.Parallel()
	gate := make(chan struct{})
	var slow atomic.Int32
	u := scriptedUpstream(t, func(r *http.Request) string {
		if strings.Contains(r.URL.Path, "slow") {
			slow.Add(1)
			<-gate
		}
		return okAnswer("v")
	})
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		twoPods(c)
		c.Upstream = u
		c.Limits = Limits{MaxUpstreamConns: 16} // no per-pod connection limit: a share of 2
	})
	t.Cleanup(func() { close(gate) })
	const flood = 20
	var answered, refused atomic.Int32 // answered before the gate opens; of them, 429 with Retry-After
	for i := range flood {
		k := dialFrom(t, "127.0.0.1", f.proxy.URL)
		k.send(fmt.Sprintf("%sinstance/attributes/slow-%d", v1, i))
		go func() {
			_ = k.conn.SetReadDeadline(time.Now().Add(time.Minute))
			resp, err := http.ReadResponse(k.br, &http.Request{Method: "GET"})
			if err == nil && resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") != "" {
				refused.Add(1)
			}
			answered.Add(1)
		}()
	}
	waitFor(t, "every flood request upstream or answered", func() bool { return int(answered.Load()+slow.Load()) == flood })
	if n := refused.Load(); n != flood-2 {
		t.Errorf("%d of the flooding pod's %d requests refused 429, want all but its share of 2", n, flood)
	}
	if r := dialFrom(t, "127.0.0.2", f.proxy.URL).get(v1 + "instance/zone"); r.status != 200 {
		t.Errorf("the other pod's request: %d %q, want 200", r.status, r.body)
	}
	if m := scrape(t, f); !strings.Contains(m, fmt.Sprintf(`metaconceal_proxy_refused_requests_total{namespace="team-a",reason="share_upstream_conns"} %d`, flood-2)) {
		t.Errorf("refusals not counted:\n%s", grepLines(m, "refused"))
	}
}

func TestMaxUpstreamConns(t *testing.T) {
	t.Parallel()
	var inFlight atomic.Int32
	release := make(chan struct{})
	u := scriptedUpstream(t, func(r *http.Request) string {
		inFlight.Add(1)
		<-release
		return okAnswer("slow")
	})
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Upstream = u
		c.UpstreamTimeout = 5 * time.Second
		c.Limits = Limits{MaxUpstreamConns: 1}
		c.Cache = CacheConfig{Disabled: true}
	})
	first := make(chan answer, 1)
	go func() { first <- raw(t, f.proxy.URL, "GET", v1+"project/project-id", flavor) }()
	waitFor(t, "the first request upstream", func() bool { return inFlight.Load() == 1 })
	start := time.Now()
	a := dialFrom(t, "127.0.0.2", f.proxy.URL).get(v1 + "instance/zone") // another pod: within its share
	wantRefused(t, "second request with the only slot busy", a, http.StatusServiceUnavailable)
	if d := time.Since(start); d < upstreamSlotWait || d > 3*time.Second {
		t.Errorf("busy answer after %s", d)
	}
	close(release)
	<-first
	if inFlight.Load() != 1 {
		t.Errorf("%d requests reached the upstream, want 1", inFlight.Load())
	}
}

// An audit line stays bounded whatever the request: a 14 KB path writes a line of
// under 2 KiB.
func TestAuditLineBounded(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	long := v1 + "instance/attributes/kube-env/" + strings.Repeat("%41", 14<<10/3)
	if a := raw(t, f.proxy.URL, "GET", long, flavor); a.status != 403 {
		t.Fatalf("long kube-env path: %d", a.status)
	}
	var line string
	for l := range strings.SplitSeq(f.logs.String(), "\n") {
		if strings.Contains(l, "metadata request blocked") {
			line = l
		}
	}
	if line == "" || len(line) > 2048 {
		t.Errorf("audit line of %d bytes, want 1..2048: %.200s", len(line), line)
	}
}

func TestLimitsValidate(t *testing.T) {
	t.Parallel()
	for _, l := range []Limits{{PodRate: -1}, {PodRate: 10}, {PodMaxConns: -1}, {MaxUpstreamConns: -5}} {
		if err := l.Validate(); err == nil {
			t.Errorf("%+v accepted", l)
		}
	}
	for _, l := range []Limits{{}, DefaultLimits} {
		if err := l.Validate(); err != nil {
			t.Errorf("%+v: %v", l, err)
		}
	}
}

// A server on a listener of its own (NewServer without Handler.Listener) still counts
// connections per pod, through its ConnContext and ConnState hooks: a request on a
// connection over the cap is answered 429 and the connection closed.
func TestPodMaxConnsWithoutListener(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Limits = Limits{PodMaxConns: 1} })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(f.handler, f.handler.log)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	base := "http://" + ln.Addr().String()
	first := dialFrom(t, "127.0.0.1", base)
	if r := first.get(v1 + "project/project-id"); r.status != 200 {
		t.Fatalf("first connection: %d", r.status)
	}
	r := dialFrom(t, "127.0.0.1", base).get(v1 + "project/project-id")
	wantRefused(t, "second connection", r, http.StatusTooManyRequests)
	if !r.close {
		t.Error("the connection over the cap was not closed")
	}
	first.conn.Close()
	waitFor(t, "connections given back", func() bool { return f.handler.clientConnsOpen() == 0 })
}

// A pod that keeps opening connections over its cap is told 429 at most
// connRefusalsPerSecond times a second; its further connections are reset, the
// cheapest refusal there is.
func TestConnectionFloodReset(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Limits = Limits{PodMaxConns: 1} })
	held := dialFrom(t, "127.0.0.1", f.proxy.URL)
	if r := held.get(v1 + "project/project-id"); r.status != 200 {
		t.Fatalf("within the cap: %d", r.status)
	}
	told, reset := 0, 0
	for range 3 * connRefusalsPerSecond {
		conn, err := net.Dial("tcp", strings.TrimPrefix(f.proxy.URL, "http://"))
		if err != nil {
			reset++
			continue
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(conn, "GET %sproject/project-id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n", v1)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		switch {
		case err != nil:
			reset++
		case resp.StatusCode == http.StatusTooManyRequests:
			told++
		default:
			t.Errorf("over the cap: %d", resp.StatusCode)
		}
		conn.Close()
	}
	if told == 0 || told > connRefusalsPerSecond+1 || reset == 0 {
		t.Errorf("%d told 429, %d reset; want 1..%d told and the rest reset", told, reset, connRefusalsPerSecond+1)
	}
	if m := scrape(t, f); !strings.Contains(m, fmt.Sprintf(`metaconceal_proxy_refused_requests_total{namespace="team-a",reason="pod_conns"} %d`, 3*connRefusalsPerSecond)) {
		t.Errorf("every refusal counted:\n%s", grepLines(m, "refused"))
	}
}

// A wrapped Handler keeps its per-pod caps: connections accepted through
// Handler.Listener carry their pod to the request whatever wraps the Handler, and
// NewServer says when it cannot count connections itself.
func TestWrappedHandlerKeepsPodCaps(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	var seen atomic.Pointer[connInfo]
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Limits = Limits{PodMaxConns: 1} })
	wrapped := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ci, _ := r.Context().Value(connInfoKey{}).(*connInfo)
		seen.Store(ci)
		f.handler.ServeHTTP(w, r)
	})
	srv := httptest.NewUnstartedServer(wrapped)
	srv.Config = NewServer(wrapped, slog.New(slog.NewTextHandler(&logs, nil)))
	srv.Listener = f.handler.ListenerFor(srv.Listener, podindex.Attested)
	srv.Start()
	t.Cleanup(srv.Close)
	if !strings.Contains(logs.String(), "handler is wrapped") {
		t.Errorf("NewServer with a wrapped handler logged %q; want a warning that it cannot count connections", logs.String())
	}
	held := dialFrom(t, "127.0.0.1", srv.URL)
	if a := held.get("/computeMetadata/v1/project/project-id"); a.status != http.StatusOK {
		t.Fatalf("first connection: %d %q", a.status, a.body)
	}
	if ci := seen.Load(); ci == nil || ci.src.pod.Name != "web-0" {
		t.Errorf("the wrapped handler's request carries connection %+v; want the pod the Listener identified", ci)
	}
	over := dialFrom(t, "127.0.0.1", srv.URL)
	wantRefused(t, "a second connection over the cap, wrapped handler", over.read(), http.StatusTooManyRequests)
}
