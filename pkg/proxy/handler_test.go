package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// fixture is the real proxy handler in front of the fake GCE metadata server, both on
// 127.0.0.1.
type fixture struct {
	fake     *fakegce.Server
	upstream *httptest.Server
	handler  *Handler
	proxy    *httptest.Server
	logs     *syncBuffer

	mu       sync.Mutex
	received []*http.Request // every request that reached the fake
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

type fixedPods map[netip.Addr]podindex.Pod

func (f fixedPods) Lookup(ip netip.Addr) (podindex.Pod, bool) {
	p, ok := f[ip.Unmap()]
	return p, ok
}

func newFixture(t *testing.T, mode policy.RecursiveMode, tweak func(*Config)) *fixture {
	t.Helper()
	f := &fixture{fake: fakegce.New(), logs: &syncBuffer{}}
	f.fake.OnRequest(func(r *http.Request) {
		f.mu.Lock()
		f.received = append(f.received, r)
		f.mu.Unlock()
	})
	f.upstream = httptest.NewServer(f.fake)
	t.Cleanup(f.upstream.Close)
	pol, err := policy.New(policy.Config{Recursive: mode})
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(f.upstream.URL)
	cfg := Config{
		Upstream: u,
		Policy:   pol,
		Pods:     fixedPods{netip.MustParseAddr("127.0.0.1"): {Namespace: "team-a", Name: "web-0"}},
		Log:      slog.New(slog.NewJSONHandler(f.logs, nil)),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	f.handler, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.handler.Close)
	f.proxy = httptest.NewUnstartedServer(f.handler)
	f.proxy.Config = NewServer(f.handler, cfg.Log)
	f.proxy.Listener = f.handler.ListenerFor(f.proxy.Listener, podindex.Attested) // as metaconceal-proxy serves attested connections
	f.proxy.Start()
	t.Cleanup(f.proxy.Close)
	return f
}

// exposedURL serves h on a second loopback listener that plays the exposed listener
// (the host guard sends an exposed attachment's connections there) and returns its URL.
func exposedURL(t *testing.T, h *Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(h, h.log)
	go func() { _ = srv.Serve(h.ListenerFor(ln, podindex.Exposed)) }()
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

func (f *fixture) receivedURIs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, r := range f.received {
		out = append(out, r.RequestURI)
	}
	return out
}

type answer struct {
	status int
	header http.Header
	body   string
	close  bool // the server said Connection: close
}

// raw sends target exactly as given (no client-side URL cleaning) over a new
// connection and reads the answer.
func raw(t *testing.T, base, method, target string, headers map[string]string) answer {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: metadata.google.internal\r\nConnection: close\r\n", method, target)
	for k, v := range headers {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, string(body), resp.Close}
}

var flavor = map[string]string{"Metadata-Flavor": "Google"}

func TestAllowed(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	base := f.proxy.URL

	a := raw(t, base, "GET", "/computeMetadata/v1/project/project-id", flavor)
	if a.status != 200 || a.body != "fake-project" {
		t.Fatalf("project-id: %d %q", a.status, a.body)
	}
	if a.header.Get("Metadata-Flavor") != "Google" || a.header.Get("ETag") == "" {
		t.Errorf("project-id: Metadata-Flavor %q, ETag %q: upstream headers not preserved", a.header.Get("Metadata-Flavor"), a.header.Get("ETag"))
	}

	// The upstream enforces the header; the proxy passes its refusal on.
	if a := raw(t, base, "GET", "/computeMetadata/v1/project/project-id", nil); a.status != 403 || strings.Contains(a.body, "metaconceal") {
		t.Errorf("without Metadata-Flavor: %d %q, want the upstream's own 403", a.status, a.body)
	}

	a = raw(t, base, "GET", "/computeMetadata/v1/instance", flavor)
	if a.status != 301 || a.header.Get("Location") != "/computeMetadata/v1/instance/" {
		t.Errorf("dir without slash: %d Location %q, want 301 to /computeMetadata/v1/instance/", a.status, a.header.Get("Location"))
	}

	a = raw(t, base, "GET", "/computeMetadata/v1/instance/service-accounts/default/token", flavor)
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	if a.status != 200 || json.Unmarshal([]byte(a.body), &tok) != nil || tok.AccessToken == "" {
		t.Errorf("token: %d %q", a.status, a.body)
	}

	a = raw(t, base, "GET", "/computeMetadata/v1/instance/service-accounts/default/?recursive=true", flavor)
	if a.status != 200 || !strings.Contains(a.body, `"email"`) {
		t.Errorf("recursive service account: %d %q", a.status, a.body)
	}

	// A leaf's recursive answer is a bare JSON value (here an array): passed on.
	a = raw(t, base, "GET", "/computeMetadata/v1/instance/service-accounts/default/scopes?recursive=true", flavor)
	if a.status != 200 || !strings.HasPrefix(a.body, "[") {
		t.Errorf("recursive leaf: %d %q", a.status, a.body)
	}

	a = raw(t, base, "GET", "/computeMetadata/v1/instance/attributes/", flavor)
	if a.status != 200 || !strings.Contains(a.body, "kube-env\n") || strings.Contains(a.body, fakegce.KubeEnvMarker) {
		t.Errorf("attributes listing: %d %q, want key names only", a.status, a.body)
	}

	a = raw(t, base, "HEAD", "/computeMetadata/v1/project/project-id", flavor)
	if a.status != 200 || a.body != "" || a.header.Get("Content-Length") != "12" {
		t.Errorf("HEAD: %d %q Content-Length %q", a.status, a.body, a.header.Get("Content-Length"))
	}

	// What reached the upstream is the canonical form, never the raw one.
	a = raw(t, base, "GET", "//computeMetadata/./v1/instance/../project%2Fproject-id?ALT=Text", flavor)
	if a.status != 200 || a.body != "fake-project" {
		t.Errorf("non-canonical spelling: %d %q", a.status, a.body)
	}
	uris := f.receivedURIs()
	if last := uris[len(uris)-1]; last != "/computeMetadata/v1/project/project-id?alt=text" {
		t.Errorf("upstream received %q, want the canonical /computeMetadata/v1/project/project-id?alt=text", last)
	}
	for _, r := range f.received {
		if _, ok := r.Header["X-Forwarded-For"]; ok {
			t.Errorf("upstream received X-Forwarded-For on %s", r.RequestURI)
		}
	}
}

func TestConcealedAndDenied(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const v1 = "/computeMetadata/v1/"
	concealed := []string{
		v1 + "instance/attributes/kube-env",
		v1 + "instance/attributes/KUBE-ENV",
		v1 + "instance/attributes/%6bube-env",
		v1 + "instance/attributes/kube%2Denv",
		v1 + "instance/attributes%2Fkube-env",
		v1 + "instance/attributes//kube-env",
		v1 + "instance/attributes/../attributes/kube-env",
		v1 + "instance/attributes/%2e%2e/attributes/kube-env/",
		v1 + "instance/service-accounts/default/identity?audience=x",
		v1 + "instance/service-accounts//default/identity?audience=x",
		v1 + "instance/service-accounts/../service-accounts/default/identity?audience=x",
		v1 + "instance/service-accounts/123456789012-compute@developer.gserviceaccount.com/identity?audience=x",
	}
	denied := map[string]string{
		"/0.1/meta-data/attributes/kube-env":                           "legacy-api",
		"/computeMetadata/v1beta1/instance/attributes/kube-env":        "legacy-api",
		"/computeMetadata/v2/":                                         "unknown-api-version",
		v1 + "instance/?recursive=true":                                "recursive",
		v1 + "?%72%65%63%75%72%73%69%76%65=true":                       "recursive",
		v1 + "instance/attributes/?recursive=true&alt=text":            "recursive",
		v1 + "instance/?recursive%3Dtrue":                              "unknown-query-key",
		v1 + "instance/?something=else":                                "unknown-query-key",
		v1 + "project/project-id?alt=text;recursive=true":              "semicolon-in-query",
		v1 + "instance/attributes%252Fkube-env":                        "bad-escape",
		v1 + "instance\\attributes\\kube-env":                          "bad-character",
		"http://169.254.169.254" + v1 + "instance/attributes/kube-env": "request-target",
	}
	for _, target := range concealed {
		for _, method := range []string{"GET", "HEAD"} {
			a := raw(t, f.proxy.URL, method, target, flavor)
			wantBody := policy.ConcealedBody
			if method == "HEAD" {
				wantBody = ""
			}
			if a.status != 403 || a.body != wantBody || a.header.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Errorf("%s %s: %d %q %q, want the concealed answer", method, target, a.status, a.header.Get("Content-Type"), a.body)
			}
		}
	}
	for target, rule := range denied {
		a := raw(t, f.proxy.URL, "GET", target, flavor)
		if a.status != 403 || !strings.Contains(a.body, "rule "+rule+":") {
			t.Errorf("GET %s: %d %q, want 403 naming rule %s", target, a.status, a.body, rule)
		}
	}
	for _, method := range []string{"POST", "PUT", "DELETE", "OPTIONS", "PATCH"} {
		a := raw(t, f.proxy.URL, method, v1+"project/project-id", flavor)
		if a.status != 403 || !strings.Contains(a.body, "rule method:") {
			t.Errorf("%s: %d %q, want 403 naming rule method", method, a.status, a.body)
		}
	}
	if a := raw(t, f.proxy.URL, "OPTIONS", "*", nil); a.status != 403 {
		t.Errorf("OPTIONS *: %d %q, want 403", a.status, a.body)
	}
	xff := map[string]string{"Metadata-Flavor": "Google", "X-Forwarded-For": "10.0.0.1"}
	if a := raw(t, f.proxy.URL, "GET", "/", xff); a.status != 403 || !strings.Contains(a.body, "x-forwarded-for") {
		t.Errorf("X-Forwarded-For: %d %q", a.status, a.body)
	}
	if uris := f.receivedURIs(); len(uris) != 0 {
		t.Errorf("concealed or denied requests reached the upstream: %q", uris)
	}

	// One audit line per blocked request, naming the pod.
	var line struct {
		Msg, Verdict, Rule, Path string
		PodNamespace             string `json:"pod_namespace"`
		PodName                  string `json:"pod_name"`
		SourceIP                 string `json:"source_ip"`
	}
	var first string
	for l := range strings.SplitSeq(f.logs.String(), "\n") {
		if strings.Contains(l, `"msg":"metadata request blocked"`) {
			first = l
			break
		}
	}
	if err := json.Unmarshal([]byte(first), &line); err != nil {
		t.Fatalf("audit line %q: %v", first, err)
	}
	if line.Verdict != "conceal" || line.Rule != "kube-env" || line.PodNamespace != "team-a" || line.PodName != "web-0" ||
		line.SourceIP != "127.0.0.1" || line.Path != v1+"instance/attributes/kube-env" {
		t.Errorf("audit line = %+v", line)
	}
	// Audit lines are rate-limited per pod: the first auditBurst are written, the
	// rest counted and summarised.
	blocked := 2*len(concealed) + len(denied) + 5 + 2
	if n := strings.Count(f.logs.String(), `"msg":"metadata request blocked"`); n != auditBurst {
		t.Errorf("%d audit lines, want %d (the pod's audit burst)", n, auditBurst)
	}
	want := fmt.Sprintf(`metaconceal_proxy_audit_lines_dropped_total{namespace="team-a"} %d`, blocked-auditBurst)
	if m := scrape(t, f); !strings.Contains(m, want) {
		t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "audit_lines_dropped"))
	}
	f.handler.clients.sweep(time.Now())
	if !strings.Contains(f.logs.String(), fmt.Sprintf(`"msg":"audit lines dropped: this pod exceeded its audit rate","dropped":%d,"pod_namespace":"team-a","pod_name":"web-0"`, blocked-auditBurst)) {
		t.Errorf("no summary of the dropped audit lines in the log:\n%s", grepLines(f.logs.String(), "dropped"))
	}
}

func TestRecursiveFilter(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveFilter, nil)
	for _, target := range []string{
		"/computeMetadata/v1/?recursive=true",
		"/computeMetadata/v1/instance/?recursive=true",
		"/computeMetadata/v1/instance/attributes/?Recursive=TRUE&alt=json",
	} {
		a := raw(t, f.proxy.URL, "GET", target, flavor)
		if a.status != 200 || strings.Contains(a.body, fakegce.KubeEnvMarker) || strings.Contains(strings.ToLower(a.body), "kube-env") {
			t.Errorf("%s: %d, kube-env left in %q", target, a.status, a.body)
		}
		if !strings.Contains(a.body, "cluster-name") {
			t.Errorf("%s: the other attributes were lost: %q", target, a.body)
		}
		if a.header.Get("ETag") == "" {
			t.Errorf("%s: ETag not preserved", target)
		}
	}
	a := raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/instance/attributes/?recursive=true&alt=text", flavor)
	if a.status != 403 || !strings.Contains(a.body, "recursive-alt-text") {
		t.Errorf("recursive alt=text: %d %q, want 403 recursive-alt-text", a.status, a.body)
	}
	// A recursive long poll is filtered too.
	a = raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/instance/attributes/?recursive=true&wait_for_change=true&last_etag=0", flavor)
	if a.status != 200 || strings.Contains(a.body, fakegce.KubeEnvMarker) || !strings.Contains(a.body, "cluster-name") {
		t.Errorf("recursive long poll: %d %q", a.status, a.body)
	}
}

func etagOf(t *testing.T, base, path string) string {
	t.Helper()
	a := raw(t, base, "GET", path, flavor)
	if a.status != 200 || a.header.Get("ETag") == "" {
		t.Fatalf("GET %s: %d, ETag %q", path, a.status, a.header.Get("ETag"))
	}
	return a.header.Get("ETag")
}

func TestLongPollHeldAndReleasedByChange(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const attr = "/computeMetadata/v1/instance/attributes/watched"
	f.fake.Set("instance/attributes/watched", "before")
	etag := etagOf(t, f.proxy.URL, attr)

	const hold = 5 * time.Second
	start := time.Now()
	done := make(chan answer, 1)
	go func() {
		done <- raw(t, f.proxy.URL, "GET", attr+"?wait_for_change=true&timeout_sec=60&last_etag="+etag, flavor)
	}()
	select {
	case a := <-done:
		t.Fatalf("long poll returned before any change: %d %q", a.status, a.body)
	case <-time.After(hold):
	}
	f.fake.Set("instance/attributes/watched", "after")
	a := <-done
	if a.status != 200 || a.body != "after" || a.header.Get("ETag") == etag {
		t.Fatalf("released long poll: %d %q ETag %q (old %q)", a.status, a.body, a.header.Get("ETag"), etag)
	}
	if held := time.Since(start); held < hold {
		t.Errorf("held %s, want at least %s", held, hold)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	var upstreamCtx atomic.Pointer[context.Context]
	f.fake.OnRequest(func(r *http.Request) {
		if r.URL.Query().Get("wait_for_change") == "true" {
			ctx := r.Context()
			upstreamCtx.Store(&ctx)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", f.proxy.URL+"/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=300", nil)
	req.Header.Set("Metadata-Flavor", "Google")
	errc := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	waitFor(t, "the long poll to reach the upstream", func() bool { return upstreamCtx.Load() != nil })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("client error %v, want context.Canceled", err)
	}
	select {
	case <-(*upstreamCtx.Load()).Done():
	case <-time.After(5 * time.Second):
		t.Fatal("upstream long poll still open 5s after its only client left")
	}
	waitFor(t, "the flight to be dropped", func() bool { return f.handler.polls.Len() == 0 })
}

func TestCoalescing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const attr = "/computeMetadata/v1/instance/attributes/coalesced"
	f.fake.Set("instance/attributes/coalesced", "v1")
	etag := etagOf(t, f.proxy.URL, attr)
	var polls atomic.Int32
	f.fake.OnRequest(func(r *http.Request) {
		if r.URL.Query().Get("wait_for_change") == "true" {
			polls.Add(1)
		}
	})

	const n = 25
	results := make(chan answer, n)
	for i := range n {
		// Different spellings of the same canonical poll share one upstream request.
		target := attr + "?wait_for_change=true&timeout_sec=60&last_etag=" + etag
		if i%2 == 1 {
			target = attr + "?last_etag=" + etag + "&Timeout_Sec=60&WAIT_FOR_CHANGE=True"
		}
		go func() { results <- raw(t, f.proxy.URL, "GET", target, flavor) }()
	}
	waitFor(t, "all polls to be held", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 25\n")
	})
	f.fake.Set("instance/attributes/coalesced", "v2")
	for range n {
		if a := <-results; a.status != 200 || a.body != "v2" {
			t.Errorf("coalesced poll: %d %q", a.status, a.body)
		}
	}
	if got := polls.Load(); got != 1 {
		t.Errorf("%d identical polls made %d upstream requests, want 1", n, got)
	}
	if m := scrape(t, f); !strings.Contains(m, "metaconceal_proxy_long_polls_coalesced_total 24\n") {
		t.Errorf("coalesced counter not 24:\n%s", grepLines(m, "coalesced"))
	}
}

func TestUpstreamDown(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := ln.Addr().String()
	ln.Close() // nothing listens there any more: connection refused
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = &url.URL{Scheme: "http", Host: deadAddr} })
	for _, target := range []string{"/computeMetadata/v1/project/project-id", "/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=5"} {
		a := raw(t, f.proxy.URL, "GET", target, flavor)
		if a.status != 502 || !strings.Contains(a.body, "unreachable") {
			t.Errorf("%s with upstream down: %d %q, want 502 unreachable", target, a.status, a.body)
		}
	}
	if err := f.handler.Ready(context.Background()); err == nil {
		t.Error("Ready succeeded with the upstream down")
	}
}

func TestUpstreamSlow(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(slow.Close)
	t.Cleanup(func() { close(release) })
	u, _ := url.Parse(slow.URL)
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Upstream = u
		c.UpstreamTimeout = 300 * time.Millisecond
		c.LongPollSlack = 300 * time.Millisecond
	})
	for _, target := range []string{"/computeMetadata/v1/project/project-id", "/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=1"} {
		start := time.Now()
		a := raw(t, f.proxy.URL, "GET", target, flavor)
		if a.status != 504 || !strings.Contains(a.body, "did not answer") {
			t.Errorf("%s with a stalled upstream: %d %q, want 504", target, a.status, a.body)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("%s: answered after %s", target, took)
		}
	}
}

func scrape(t *testing.T, f *fixture) string {
	t.Helper()
	rec := httptest.NewRecorder()
	AdminMux(f.handler).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("/metrics: %d", rec.Code)
	}
	return rec.Body.String()
}

func grepLines(s, substr string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestMetricsAndHealth(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/project/project-id", flavor)
	raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/project/project-id", flavor)
	raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/instance/attributes/kube-env", flavor)
	raw(t, f.proxy.URL, "GET", "/0.1/meta-data/", flavor)
	m := scrape(t, f)
	for _, want := range []string{
		`metaconceal_proxy_requests_total{rule="v1",verdict="allow"} 2`,
		`metaconceal_proxy_requests_total{rule="kube-env",verdict="conceal"} 1`,
		`metaconceal_proxy_requests_total{rule="legacy-api",verdict="deny"} 1`,
		`metaconceal_proxy_requests_total{rule="identity",verdict="conceal"} 0`,
		`metaconceal_proxy_blocked_requests_by_namespace_total{namespace="team-a",verdict="conceal"} 1`,
		// The second project-id is answered from the cache (cache.go).
		`metaconceal_proxy_upstream_duration_seconds_count{kind="request"} 1`,
		`metaconceal_proxy_cache_hits_total{kind="fact"} 1`,
		`metaconceal_proxy_long_polls_open 0`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %s", want)
		}
	}
	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200} {
		rec := httptest.NewRecorder()
		AdminMux(f.handler).ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != want {
			t.Errorf("%s: %d %q", path, rec.Code, rec.Body.String())
		}
	}
}

func TestListenAddressNotConfigured(t *testing.T) {
	t.Parallel()
	// 192.0.2.0/24 is TEST-NET-1: never configured here. Binding sends no packet.
	_, err := Listen(context.Background(), "192.0.2.77:988")
	if !errors.Is(err, ErrAddressNotConfigured) || !strings.Contains(err.Error(), "192.0.2.77:988") {
		t.Fatalf("Listen on an unconfigured address: %v, want ErrAddressNotConfigured naming it", err)
	}
	ln, err := Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}

func TestNewRejectsBadUpstream(t *testing.T) {
	t.Parallel()
	pol, _ := policy.New(policy.Config{})
	for _, raw := range []string{"169.254.169.254", "http://169.254.169.254/computeMetadata/", "ftp://x", "http://u:p@x"} {
		u, _ := url.Parse(raw)
		if _, err := New(Config{Upstream: u, Policy: pol}); err == nil {
			t.Errorf("New accepted upstream %q", raw)
		}
	}
}

func TestLongPollHeadAndShutdown(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const attr = "/computeMetadata/v1/instance/attributes/cluster-name"

	// An etag that differs answers at once; the parked answer closes the connection.
	a := raw(t, f.proxy.URL, "HEAD", attr+"?wait_for_change=true&last_etag=0", flavor)
	if a.status != 200 || a.body != "" || a.header.Get("Content-Length") != strconv.Itoa(len("fake-cluster")) || !a.close {
		t.Errorf("HEAD long poll: %d %q %v", a.status, a.body, a.header)
	}
	a = raw(t, f.proxy.URL, "GET", attr+"?wait_for_change=true&last_etag=0", flavor)
	if a.status != 200 || a.body != "fake-cluster" || a.header.Get("ETag") == "" {
		t.Errorf("GET long poll with an old etag: %d %q", a.status, a.body)
	}

	// Shutting down answers held polls 503 instead of cutting them.
	etag := etagOf(t, f.proxy.URL, attr)
	done := make(chan answer, 1)
	go func() {
		done <- raw(t, f.proxy.URL, "GET", attr+"?wait_for_change=true&timeout_sec=60&last_etag="+etag, flavor)
	}()
	waitFor(t, "the poll to be held", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 1\n")
	})
	f.handler.Close()
	select {
	case a := <-done:
		if a.status != 503 || !strings.Contains(a.body, "shutting down") {
			t.Errorf("held poll at shutdown: %d %q, want 503", a.status, a.body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("held poll not answered 5s after Close")
	}
	waitFor(t, "the open polls gauge to return to 0", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 0\n")
	})
}

// An upstream that drops idle keep-alive connections must not fail the next request:
// a request that failed on a reused connection before any answer is retried once.
func TestUpstreamClosesIdleConnections(t *testing.T) {
	t.Parallel()
	fake := fakegce.New()
	up := httptest.NewUnstartedServer(fake)
	up.Config.IdleTimeout = 50 * time.Millisecond
	up.Start()
	t.Cleanup(up.Close)
	u, _ := url.Parse(up.URL)
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = u })
	// Several requests at once leave several connections in the pool.
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/project/project-id", flavor)
		}()
	}
	wg.Wait()
	for i := range 3 {
		time.Sleep(200 * time.Millisecond) // the upstream closes the pooled connections
		if a := raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/project/project-id", flavor); a.status != 200 || a.body != "fake-project" {
			t.Fatalf("request %d after the upstream closed its idle connection: %d %q", i, a.status, a.body)
		}
	}
}

func TestClientGoneCancelsOrdinaryRequest(t *testing.T) {
	t.Parallel()
	reached := make(chan context.Context, 1)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached <- r.Context()
		<-r.Context().Done()
	}))
	t.Cleanup(slow.Close)
	u, _ := url.Parse(slow.URL)
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = u; c.UpstreamTimeout = time.Minute })
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", f.proxy.URL+"/computeMetadata/v1/project/project-id", nil)
	go func() {
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	var upstreamCtx context.Context
	select {
	case upstreamCtx = <-reached:
	case <-time.After(5 * time.Second):
		t.Fatal("request never reached the upstream")
	}
	cancel()
	select {
	case <-upstreamCtx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request still open 5s after the client left")
	}
}

// A pod the plugin left unconcealed on purpose (mode EXPOSED, an excluded namespace)
// reaches the proxy only through the host guard; it is served in full.
func TestExposedPodServedInFull(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Pods = fixedPods{netip.MustParseAddr("127.0.0.1"): {Namespace: "kube-system", Name: "agent", Exposed: true}}
	})
	if a := raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/instance/attributes/kube-env", flavor); a.status != 403 {
		t.Errorf("kube-env on the attested listener, for a pod whose record says exposed: %d; want concealed (exposure is the listener's)", a.status)
	}
	exposed := exposedURL(t, f.handler)
	a := raw(t, exposed, "GET", "/computeMetadata/v1/instance/attributes/kube-env", flavor)
	if a.status != 200 || !strings.Contains(a.body, fakegce.KubeEnvMarker) {
		t.Errorf("kube-env for an exposed pod: %d %q", a.status, a.body)
	}
	a = raw(t, exposed, "GET", "/computeMetadata/v1/instance/?recursive=true", flavor)
	if a.status != 200 || !strings.Contains(a.body, fakegce.KubeEnvMarker) {
		t.Errorf("recursive listing for an exposed pod: %d, kube-env missing", a.status)
	}
	a = raw(t, exposed, "GET", "/0.1/meta-data/attributes/kube-env", flavor)
	if a.status != 403 || !strings.Contains(a.body, "legacy-api") {
		t.Errorf("legacy API for an exposed pod: %d %q, want still denied", a.status, a.body)
	}
	if m := scrape(t, f); !strings.Contains(m, `metaconceal_proxy_requests_total{rule="exposed-pod",verdict="allow"} 2`+"\n") {
		t.Errorf("exposed-pod counter:\n%s", grepLines(m, "exposed"))
	}
	if !strings.Contains(f.logs.String(), `"msg":"metadata request served to an exposed pod"`) {
		t.Errorf("no log line for the exposed pod's access: %s", f.logs.String())
	}
}
