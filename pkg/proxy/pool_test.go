package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"
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

func poolGet(t *testing.T, rt http.RoundTripper, u *url.URL, target string, hdr http.Header, d time.Duration) (*http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, "GET", u.String()+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header = hdr
	return rt.RoundTrip(req)
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
			p := NewPool(u)
			for range 2 {
				resp, err := poolGet(t, p, u, "/x", nil, 5*time.Second)
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

// The pool sends the request's Host, path, query and Metadata-Flavor, and nothing
// else of it.
func TestPoolSendsOnlyWhatItIsGiven(t *testing.T) {
	t.Parallel()
	got := make(chan *http.Request, 1)
	u, _ := poolUpstream(t, func(w http.ResponseWriter, r *http.Request) { got <- r })
	hdr := http.Header{"Metadata-Flavor": {"Google"}, "X-Forwarded-For": {"10.0.0.9"}, "Authorization": {"Bearer x"}}
	resp, err := poolGet(t, NewPool(u), u, "/computeMetadata/v1/instance/tags?alt=json", hdr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	r := <-got
	if r.URL.RequestURI() != "/computeMetadata/v1/instance/tags?alt=json" || r.Header.Get("Metadata-Flavor") != "Google" ||
		r.Header.Get("X-Forwarded-For") != "" || r.Header.Get("Authorization") != "" {
		t.Errorf("upstream got %s with %v; want the path and query with Metadata-Flavor only", r.URL.RequestURI(), r.Header)
	}
}

// A request ends at its context's deadline.
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
	_, err := poolGet(t, NewPool(u), u, "/slow", nil, 200*time.Millisecond)
	var ne net.Error
	if !errors.Is(err, context.DeadlineExceeded) && !(errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("slow upstream: %v; want a timeout", err)
	}
}
