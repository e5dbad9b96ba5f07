package proxy

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// BenchmarkHandler compares the handler's cost per request with a bare
// httputil.ReverseProxy against the same upstream (allocations are the point:
// go test -bench Handler -benchmem).
func BenchmarkHandler(b *testing.B) {
	upstream := httptest.NewServer(fakegce.New())
	b.Cleanup(upstream.Close)
	u, _ := url.Parse(upstream.URL)
	pol, _ := policy.New(policy.Config{})
	h, err := New(Config{Upstream: u, Policy: pol})
	if err != nil {
		b.Fatal(err)
	}
	rp := &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(u) },
		Transport: &http.Transport{MaxIdleConnsPerHost: 1024},
	}
	for name, handler := range map[string]http.Handler{"metaconceal": h, "reverseproxy": rp} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req := httptest.NewRequest("GET", "/computeMetadata/v1/project/project-id", nil)
					req.Header.Set("Metadata-Flavor", "Google")
					rec := httptest.NewRecorder()
					handler.ServeHTTP(rec, req)
					if rec.Code != 200 {
						b.Fatalf("status %d", rec.Code)
					}
				}
			})
		})
	}
}

// BenchmarkHandlerCacheOff is the upstream path: the cache off, a key of its own per
// request loop (no flight shared), so each request is sent upstream
// (go test -bench HandlerCacheOff -benchmem).
func BenchmarkHandlerCacheOff(b *testing.B) {
	upstream := httptest.NewServer(fakegce.New())
	b.Cleanup(upstream.Close)
	u, _ := url.Parse(upstream.URL)
	pol, _ := policy.New(policy.Config{})
	h, err := New(Config{Upstream: u, Policy: pol, Cache: CacheConfig{Disabled: true}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(h.Close)
	var next atomic.Int32
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		target := fmt.Sprintf("/computeMetadata/v1/instance/service-accounts/default/token?scopes=https://www.googleapis.com/auth/bench-%d", next.Add(1))
		for pb.Next() {
			req := httptest.NewRequest("GET", target, nil)
			req.Header.Set("Metadata-Flavor", "Google")
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != 200 {
				b.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
		}
	})
}
