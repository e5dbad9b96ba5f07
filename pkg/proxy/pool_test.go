package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// poolUpstream is an upstream that counts its connections and echoes what it got.
func poolUpstream(t *testing.T, h http.HandlerFunc) (*url.URL, *atomic.Int32) {
	t.Helper()
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	return u, &conns
}

func poolGet(t *testing.T, p *connPool, target string, flavor []string, d time.Duration) (*http.Response, error) {
	t.Helper()
	path, query, _ := strings.Cut(target, "?")
	req := &upstreamRequest{method: "GET", host: "metadata.google.internal", path: path, rawQuery: query, flavor: flavor}
	return p.send(context.Background(), req, time.Now().Add(d), nil)
}

// The pool keeps a connection for the next request once its answer was read whole
// (closing the body drains it).
func TestPoolReusesConnectionsReadWhole(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		readWhole bool
		wantConns int32
	}{
		{"read whole: reused", true, 1},
		{"closed early: drained and reused", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			u, conns := poolUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, "0123456789")
			})
			p := newConnPool(u, DefaultMaxIdleConnsPerHost)
			for range 2 {
				resp, err := poolGet(t, p, "/x", nil, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if tc.readWhole {
					_, _ = io.ReadAll(resp.Body)
				} else {
					_, _ = io.ReadFull(resp.Body, make([]byte, 2))
				}
				resp.Body.Close()
			}
			if got := conns.Load(); got != tc.wantConns {
				t.Errorf("upstream connections %d; want %d", got, tc.wantConns)
			}
		})
	}
}

// The pool writes the canonical request it is given: Host, path, query and
// Metadata-Flavor.
func TestPoolWritesTheRequestGiven(t *testing.T) {
	t.Parallel()
	got := make(chan *http.Request, 1)
	u, _ := poolUpstream(t, func(w http.ResponseWriter, r *http.Request) { got <- r })
	resp, err := poolGet(t, newConnPool(u, 1), "/computeMetadata/v1/instance/tags?alt=json", []string{"Google"}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	r := <-got
	if r.Host != "metadata.google.internal" || r.URL.RequestURI() != "/computeMetadata/v1/instance/tags?alt=json" ||
		len(r.Header["Metadata-Flavor"]) != 1 || r.Header.Get("Metadata-Flavor") != "Google" {
		t.Errorf("upstream got Host %q %s with %v; want the Host, path and query with Metadata-Flavor: Google", r.Host, r.URL.RequestURI(), r.Header)
	}
}

// A request ends at its deadline.
func TestPoolDeadline(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	u, _ := poolUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	_, err := poolGet(t, newConnPool(u, 1), "/slow", nil, 200*time.Millisecond)
	var ne net.Error
	if !errors.Is(err, context.DeadlineExceeded) && !(errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("slow upstream: %v; want a timeout", err)
	}
}

// Config.Ordinary puts any http.RoundTripper in the pool's place (net/http's
// Transport here), with the cache off so that every request goes upstream.
func TestOrdinaryRoundTripper(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Ordinary = NewTransport()
		c.Cache.Disabled = true
	})
	for range 2 {
		if a := raw(t, f.proxy.URL, "GET", "/computeMetadata/v1/project/project-id", flavor); a.status != http.StatusOK || a.body == "" {
			t.Fatalf("GET project-id through the Transport: %d %q", a.status, a.body)
		}
	}
	if n := len(f.receivedURIs()); n != 2 {
		t.Errorf("upstream received %d requests; want 2 (cache off)", n)
	}
}
