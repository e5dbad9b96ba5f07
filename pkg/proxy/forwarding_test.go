package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/k8scheck"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// A connection that announces a body it never sends is answered at once (403,
// Connection: close) and closed, not held until a read deadline.
func TestUnsentBodyAnsweredAtOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	for _, framing := range []string{"Content-Length: 10\r\n", "Transfer-Encoding: chunked\r\n", "Expect: 100-continue\r\nContent-Length: 1000000\r\n"} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(f.proxy.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = conn.SetDeadline(start.Add(2 * time.Second))
		fmt.Fprintf(conn, "GET %sproject/project-id HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n%s\r\n", v1, framing)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			t.Fatalf("%q: no answer within 2 s: %v", framing, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 403 || !resp.Close || !strings.Contains(string(body), "request-body") {
			t.Errorf("%q: %d close=%v %q, want 403 request-body with Connection: close", framing, resp.StatusCode, resp.Close, body)
		}
		// The proxy closes its side: the client reads EOF, well before 2 s.
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("%q: after the answer: %v, want EOF (connection closed)", framing, err)
		}
		if d := time.Since(start); d > 1500*time.Millisecond {
			t.Errorf("%q: answered and closed after %s, want well under 2 s", framing, d)
		}
		conn.Close()
	}
	if uris := f.receivedURIs(); len(uris) != 0 {
		t.Errorf("requests with a body reached the upstream: %q", uris)
	}
	waitFor(t, "the refused connections given back", func() bool { return f.handler.clientConnsOpen() == 0 })
}

// --recursive=filter fails closed: only a 200 in GCE's JSON shape is filtered and
// served; anything else is a 502 that carries nothing of the upstream's answer.
func TestRecursiveFilterFailsClosed(t *testing.T) {
	t.Parallel()
	const secret = "KUBELET_KEY_FROM_THE_UPSTREAM"
	answers := map[string]string{
		"/flat":      okJSON(`{"instance/attributes/kube-env":"` + secret + `","instance/zone":"z"}`),
		"/status500": fmt.Sprintf("HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(`{"attributes":{"kube-env":"`+secret+`"}}`), `{"attributes":{"kube-env":"`+secret+`"}}`),
		"/status301": "HTTP/1.1 301 Moved Permanently\r\nLocation: /computeMetadata/v1/instance/attributes/kube-env\r\nContent-Length: 0\r\n\r\n",
		"/notjson":   okJSON("kube-env: " + secret),
		"/named":     okJSON(`{"attributes":{"a":"see instance/attributes/kube-env"},"zone":"z"}`),
		"/arraykeys": okJSON(`[{"kube-env":"` + secret + `"}]`),
		"/good":      okJSON(`{"attributes":{"kube-env":"` + secret + `","cluster-name":"c"},"zone":"z"}`),
	}
	u := scriptedUpstream(t, func(r *http.Request) string {
		for suffix, a := range answers {
			if strings.Contains(r.URL.Path, suffix) {
				return a
			}
		}
		return okJSON(`{}`)
	})
	f := newFixture(t, policy.RecursiveFilter, func(c *Config) { c.Upstream = u })
	for _, method := range []string{"GET", "HEAD"} {
		for suffix := range answers {
			a := raw(t, f.proxy.URL, method, v1+"instance"+suffix+"/?recursive=true", flavor)
			if strings.Contains(a.body, secret) || strings.Contains(fmt.Sprint(a.header), "kube-env") {
				t.Errorf("%s %s: the client got the concealed content: %d %v %q", method, suffix, a.status, a.header, a.body)
			}
			switch suffix {
			case "/good", "/named", "/arraykeys":
				if a.status != 200 || a.header.Get("Content-Length") == "" {
					t.Errorf("%s %s: %d CL %q, want a filtered 200 with its length", method, suffix, a.status, a.header.Get("Content-Length"))
				}
				if method == "GET" && suffix != "/arraykeys" && (!strings.Contains(a.body, `"zone":"z"`) || strings.Contains(a.body, "kube-env")) {
					t.Errorf("%s %s: filtered body %q", method, suffix, a.body)
				}
			default:
				if a.status != http.StatusBadGateway {
					t.Errorf("%s %s: %d %q, want 502", method, suffix, a.status, a.body)
				}
			}
		}
	}
	if m := scrape(t, f); !strings.Contains(m, `metaconceal_proxy_upstream_errors_total{reason="bad_listing"}`) {
		t.Error("bad listings not counted")
	}
}

func okJSON(body string) string {
	return fmt.Sprintf("HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Type: application/json\r\nETag: 0123abcd\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}

// The client's Host is not forwarded: the upstream sees its own, whatever the client
// sent, so Host cannot make otherwise identical long polls distinct.
func TestClientHostNotForwarded(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	upHost := strings.TrimPrefix(f.upstream.URL, "http://")
	etag := etagOf(t, f.proxy.URL, v1+"instance/attributes/cluster-name")
	f.reset()
	for _, target := range []string{v1 + "project/project-id", v1 + "instance/attributes/cluster-name?wait_for_change=true&timeout_sec=1&last_etag=" + etag} {
		for _, host := range []string{"metadata.google.internal", "evil.example", "a.b.c"} {
			conn, err := net.Dial("tcp", strings.TrimPrefix(f.proxy.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", target, host)
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("%s Host %s: %v %v", target, host, resp, err)
			}
			conn.Close()
		}
	}
	for _, r := range f.receivedRequests() {
		if r.Host != upHost {
			t.Errorf("the upstream received Host %q for %s, want its own %q", r.Host, r.RequestURI, upHost)
		}
	}
}

// Kubernetes' metadata-concealment e2e check
// (internal/testlib/k8scheck), line by line through the real proxy in front of the fake: its success endpoints
// answer 200 (redirects followed, as its http.Client does), its no-kube-env
// endpoints 403 without "kube-env" in the body, its failure endpoints 403, and every
// success endpoint 403 with X-Forwarded-For (sent, as the check does, without
// Metadata-Flavor).
func TestKubernetesConcealmentE2EList(t *testing.T) {
	t.Parallel()
	type check struct {
		url            string
		status         int
		bodyMustNotHas string
		xff            bool
	}
	var cases []check
	for _, u := range k8scheck.Success {
		cases = append(cases, check{url: u, status: 200}, check{url: u, status: 403, xff: true})
	}
	for _, u := range k8scheck.NoKubeEnv {
		cases = append(cases, check{url: u, status: 403, bodyMustNotHas: "kube-env"})
	}
	for _, u := range k8scheck.Failure {
		cases = append(cases, check{url: u, status: 403})
	}
	// With the default limits on, as deployed: the check is one pod's burst.
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Limits = DefaultLimits })
	proxyAddr := strings.TrimPrefix(f.proxy.URL, "http://")
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, proxyAddr) // every host is the proxy
		}},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s xff=%v", strings.TrimPrefix(tc.url, "http://"), tc.xff), func(t *testing.T) {
			req, err := http.NewRequest("GET", tc.url, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tc.xff {
				req.Header = http.Header{"X-Forwarded-For": {"Somebody-somewhere"}}
			} else {
				req.Header = http.Header{"Metadata-Flavor": {"Google"}}
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Errorf("%d %q, want %d", resp.StatusCode, body, tc.status)
			}
			if tc.bodyMustNotHas != "" && strings.Contains(string(body), tc.bodyMustNotHas) {
				t.Errorf("body %q contains %q", body, tc.bodyMustNotHas)
			}
			if hasMarker(string(body)) {
				t.Errorf("concealed content: %q", body)
			}
		})
	}
}

// scopes on tokens, as Google's auth libraries send them, reach the upstream in
// their checked form; free text in them does not.
func TestScopesOnTokens(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Cache = CacheConfig{Disabled: true} })
	const scopes = "https://www.googleapis.com/auth/cloud-platform,https://www.googleapis.com/auth/userinfo.email"
	tok := v1 + "instance/service-accounts/default/token"
	for _, q := range []string{"scopes=" + scopes, "scopes=" + url.QueryEscape(scopes)} {
		f.reset()
		a := raw(t, f.proxy.URL, "GET", tok+"?"+q, flavor)
		if a.status != 200 || !strings.Contains(a.body, "access_token") {
			t.Errorf("token with %s: %d %q", q, a.status, a.body)
		}
		got := f.receivedURIs()
		if len(got) != 1 || got[0] != tok+"?scopes="+scopes {
			t.Errorf("token with %s reached the upstream as %q", q, got)
		}
	}
	f.reset()
	for _, q := range []string{"scopes=recursive", "scopes=https://www.googleapis.com/auth/x%20recursive", "scopes=" + scopes + "&audience=x"} {
		if a := raw(t, f.proxy.URL, "GET", tok+"?"+q, flavor); a.status != 403 {
			t.Errorf("token with %s: %d %q, want 403", q, a.status, a.body)
		}
	}
	if got := f.receivedURIs(); len(got) != 0 {
		t.Errorf("refused token requests reached the upstream: %q", got)
	}
}

// Free text in any query value never reaches a lenient upstream: through the real
// proxy in front of one, none of these answers carries kube-env, and nothing the
// upstream received is a request it answers with kube-env.
func TestFreeTextNeverReachesALenientUpstream(t *testing.T) {
	t.Parallel()
	var received []*http.Request
	recv := make(chan *http.Request, 64)
	lenient := lenientUpstream{fake: fakegce.New()}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		recv <- r.Clone(context.Background())
		lenient.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	up, _ := url.Parse(srv.URL)
	f2 := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = up })
	for _, target := range []string{
		v1 + "instance/attributes/?last_etag=recursive",
		v1 + "instance/attributes/?wait_for_change=true&last_etag=recursive&timeout_sec=1",
		v1 + "instance/attributes/?alt=recursive",
		v1 + "instance/attributes/?wait_for_change=recursive",
		v1 + "instance/attributes/?timeout_sec=recursive",
		v1 + "instance/service-accounts/default/token?scopes=recursive",
		v1 + "instance/attributes/?scopes=https://www.googleapis.com/auth/recursive",
		v1 + "instance/attributes/?audience=recursive",
		v1 + "instance/attributes/?recursive",
		v1 + "instance/attributes/?x=recursive",
		v1 + "instance/attributes/?last_etag=d34db33f",
	} {
		a := raw(t, f2.proxy.URL, "GET", target, flavor)
		if hasMarker(a.body) {
			t.Errorf("%s: the client got kube-env: %d", target, a.status)
		}
	}
	close(recv)
	for r := range recv {
		received = append(received, r)
		if lenientReplayLeaks(t, r.Method, r.RequestURI, r.Header) {
			t.Errorf("the lenient upstream received %q, which it answers with kube-env", r.RequestURI)
		}
	}
	if len(received) == 0 {
		t.Error("nothing reached the upstream: the allowed control request should have")
	}
}
