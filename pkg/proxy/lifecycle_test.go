package proxy

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Drain answers every held long poll, parked (hijacked) or waiting on its handler
// goroutine, and every new one, at once with the current value and its ETag, as GCE
// answers a poll whose timeout_sec elapsed.
func TestDrainAnswersLongPollsWithTheCurrentValue(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const attr = "/computeMetadata/v1/instance/attributes/drained"
	f.fake.Set("instance/attributes/drained", "current")
	etag := etagOf(t, f.proxy.URL, attr)
	poll := attr + "?wait_for_change=true&timeout_sec=3600&last_etag=" + etag

	parked := make(chan answer, 1)
	go func() { parked <- raw(t, f.proxy.URL, "GET", poll, flavor) }()
	onGoroutine := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		// A recorder cannot be hijacked: this poll waits on its handler goroutine,
		// as one over HTTP/2 would, and http.Server.Shutdown waits for it.
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("HEAD", poll, nil)
		req.Header.Set("Metadata-Flavor", "Google")
		f.handler.ServeHTTP(rec, req)
		onGoroutine <- rec
	}()
	waitFor(t, "both polls to be held", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 2\n")
	})

	f.handler.Drain()
	select {
	case a := <-parked:
		if a.status != http.StatusOK || a.body != "current" || a.header.Get("ETag") != etag {
			t.Errorf("parked poll after Drain: %d %q ETag %q; want 200 %q ETag %q", a.status, a.body, a.header.Get("ETag"), "current", etag)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("parked poll not answered 10 s after Drain (it asked for 3600 s)")
	}
	select {
	case rec := <-onGoroutine:
		if rec.Code != http.StatusOK || rec.Header().Get("ETag") != etag || rec.Body.Len() != 0 {
			t.Errorf("HEAD poll after Drain: %d ETag %q body %q; want 200 with ETag %q and no body", rec.Code, rec.Header().Get("ETag"), rec.Body.String(), etag)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("poll on its handler goroutine not answered 10 s after Drain")
	}

	// A poll that arrives after Drain is answered at once, never held.
	done := make(chan answer, 1)
	go func() { done <- raw(t, f.proxy.URL, "GET", poll, flavor) }()
	select {
	case a := <-done:
		if a.status != http.StatusOK || a.body != "current" || a.header.Get("ETag") != etag {
			t.Errorf("new poll while draining: %d %q ETag %q; want 200 %q ETag %q", a.status, a.body, a.header.Get("ETag"), "current", etag)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("new poll held while draining")
	}
	// Ordinary requests are served as before.
	if a := raw(t, f.proxy.URL, "GET", attr, flavor); a.status != http.StatusOK || a.body != "current" {
		t.Errorf("GET while draining: %d %q", a.status, a.body)
	}
	waitFor(t, "the open polls gauge to return to 0", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 0\n")
	})
}

// A filtered recursive poll drained is answered from a checked listing, never the raw
// one.
func TestDrainKeepsListingsFiltered(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveFilter, nil)
	const dir = "/computeMetadata/v1/instance/attributes/?recursive=true"
	etag := etagOf(t, f.proxy.URL, dir)
	done := make(chan answer, 1)
	go func() {
		done <- raw(t, f.proxy.URL, "GET", dir+"&wait_for_change=true&timeout_sec=3600&last_etag="+etag, flavor)
	}()
	waitFor(t, "the poll to be held", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 1\n")
	})
	f.handler.Drain()
	select {
	case a := <-done:
		if a.status != http.StatusOK || strings.Contains(a.body, "kube-env") || !strings.Contains(a.body, "cluster-name") {
			t.Errorf("drained recursive poll: %d %q; want 200, filtered", a.status, a.body)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("recursive poll not answered 10 s after Drain")
	}
}
