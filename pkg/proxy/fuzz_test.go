package proxy

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

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// FuzzProxyNeverLeaksConcealed checks, through the real proxy handler in front of a
// lenient upstream (the fake GCE metadata server, which resolves paths leniently:
// case, encodings, dot segments, behind lenientUpstream, which reads its query
// loosely: any key or value mentioning "recursive" is a recursive listing), that:
//
//   - in the default (deny) mode, no request that reaches the upstream is one the
//     upstream would answer with kube-env content or an identity token: each request
//     the upstream received is replayed, every query key and value kept, against a
//     second lenient fake that answers long polls at once, and its answer checked;
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
		"/computeMetadata/v1/instance/attributes/?last_etag=recursive",
		"/computeMetadata/v1/instance/attributes/?wait_for_change=true&last_etag=d34db33f&timeout_sec=1",
		"/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/cloud-platform",
		"/computeMetadata/v1/instance/service-accounts/default/?recursive=true&alt=json",
	} {
		f.Add(seed, false)
	}

	fake := fakegce.New()
	type received struct {
		method, uri string
		header      http.Header
	}
	var (
		mu      sync.Mutex
		reached []received
	)
	lenient := lenientUpstream{fake: fake}
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock() // what the proxy sent, before the lenient reading
		reached = append(reached, received{r.Method, r.RequestURI, r.Header.Clone()})
		mu.Unlock()
		lenient.ServeHTTP(w, r)
	}))
	f.Cleanup(upstream.Close)
	u, _ := url.Parse(upstream.URL)
	handlers := map[policy.RecursiveMode]*Handler{}
	for _, mode := range []policy.RecursiveMode{policy.RecursiveDeny, policy.RecursiveFilter} {
		pol, err := policy.New(policy.Config{Recursive: mode})
		if err != nil {
			f.Fatal(err)
		}
		h, err := New(Config{Upstream: u, Policy: pol, UpstreamTimeout: 2 * time.Second})
		if err != nil {
			f.Fatal(err)
		}
		f.Cleanup(h.Close)
		handlers[mode] = h
	}

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
			if body := rec.Body.String(); hasMarker(body) {
				t.Fatalf("mode %s: %s %q: the client got concealed content: %d %q", mode, method, target, rec.Code, body)
			}
			if mode != policy.RecursiveDeny {
				continue // filter mode lets recursive listings go up and strips them on the way back
			}
			mu.Lock()
			got := append([]received(nil), reached...)
			mu.Unlock()
			for _, r := range got {
				if lenientReplayLeaks(t, r.method, r.uri, r.header) {
					t.Fatalf("%s %q went upstream as %s %q, which a lenient upstream answers with concealed content", method, target, r.method, r.uri)
				}
			}
		}
	})
}
