package policy_test

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/test/fakegce"
)

// FuzzProxyNeverLeaksConcealed checks, through the real proxy handler in front of
// the fake GCE metadata server (which resolves paths leniently: case, encodings, dot
// segments), that:
//
//   - in the default (deny) mode, no request that reaches the upstream is one the
//     upstream would answer with kube-env content or an identity token (each request
//     the fake received is replayed against a second fake and its answer checked);
//   - in both modes, no answer the client gets carries either.
//
// The committed corpus (testdata/fuzz/FuzzProxyNeverLeaksConcealed) holds every
// bypass class of the table tests; `make fuzz` runs it for 10 s.
func FuzzProxyNeverLeaksConcealed(f *testing.F) {
	for _, seed := range []string{
		"/computeMetadata/v1/instance/attributes/kube-env",
		"/computeMetadata/v1/instance/attributes/%6bube-env",
		"/computeMetadata/v1/instance/service-accounts/default/identity?audience=x",
		"/computeMetadata/v1/instance/?recursive=true",
		"/computeMetadata/v1/project/project-id",
	} {
		f.Add(seed, false)
	}

	fake := fakegce.New()
	var (
		mu      sync.Mutex
		reached []string
	)
	fake.OnRequest(func(r *http.Request) {
		mu.Lock()
		reached = append(reached, r.RequestURI)
		mu.Unlock()
	})
	upstream := httptest.NewServer(fake)
	f.Cleanup(upstream.Close)
	u, _ := url.Parse(upstream.URL)
	handlers := map[policy.RecursiveMode]*proxy.Handler{}
	for _, mode := range []policy.RecursiveMode{policy.RecursiveDeny, policy.RecursiveFilter} {
		pol, err := policy.New(policy.Config{Recursive: mode})
		if err != nil {
			f.Fatal(err)
		}
		h, err := proxy.New(proxy.Config{Upstream: u, Policy: pol, UpstreamTimeout: 2 * time.Second})
		if err != nil {
			f.Fatal(err)
		}
		f.Cleanup(h.Close)
		handlers[mode] = h
	}
	replay := fakegce.New() // same content, no hook

	f.Fuzz(func(t *testing.T, target string, head bool) {
		method := "GET"
		if head {
			method = "HEAD"
		}
		for _, mode := range []policy.RecursiveMode{policy.RecursiveDeny, policy.RecursiveFilter} {
			mu.Lock()
			reached = reached[:0]
			mu.Unlock()

			raw := method + " " + target + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n"
			req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
			if err != nil {
				return // not a request line net/http would hand to the proxy
			}
			req.RemoteAddr = "10.0.0.9:40000"
			// Long polls that nothing changes would block: give up on them quickly.
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			rec := httptest.NewRecorder()
			handlers[mode].ServeHTTP(rec, req.WithContext(ctx))
			cancel()
			if body := rec.Body.String(); strings.Contains(body, fakegce.KubeEnvMarker) || strings.Contains(body, fakegce.IdentityTokenMarker) {
				t.Fatalf("mode %s: %s %q: the client got concealed content: %d %q", mode, method, target, rec.Code, body)
			}
			if mode != policy.RecursiveDeny {
				continue // filter mode lets recursive listings go up and strips them on the way back
			}
			mu.Lock()
			got := append([]string(nil), reached...)
			mu.Unlock()
			for _, uri := range got {
				if leaks(t, replay, uri) {
					t.Fatalf("%s %q went upstream as %q, which the upstream answers with concealed content", method, target, uri)
				}
			}
		}
	})
}

// leaks replays a request the upstream received, without its long-poll keys, and
// reports whether the answer carries kube-env content or an identity token.
func leaks(t *testing.T, replay *fakegce.Server, uri string) bool {
	t.Helper()
	path, rawQuery, _ := strings.Cut(uri, "?")
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		t.Fatalf("upstream received a query it cannot parse: %q: %v", uri, err)
	}
	q.Del("wait_for_change")
	q.Del("timeout_sec")
	q.Del("last_etag")
	target := path
	if enc := q.Encode(); enc != "" {
		target += "?" + enc
	}
	req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(
		"GET " + target + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n")))
	if err != nil {
		t.Fatalf("replay of %q: %v", uri, err)
	}
	rec := httptest.NewRecorder()
	replay.ServeHTTP(rec, req)
	body := rec.Body.String()
	return strings.Contains(body, fakegce.KubeEnvMarker) || strings.Contains(body, fakegce.IdentityTokenMarker)
}
