package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

// failure: each upstream failure has its status, a body that says what happened, and
// is counted under its reason.
func TestResponderFailure(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		err        error
		closing    bool
		wantStatus int
		wantInBody string
		wantReason string // counted under metaconceal_proxy_upstream_errors_total; "" none
	}{
		{"unreachable", errors.New("connection refused"), false, 502, "unreachable", "unreachable"},
		{"deadline", fmt.Errorf("get: %w", context.DeadlineExceeded), false, 504, "did not answer within 15s", "timeout"},
		{"net timeout", timeoutErr{}, false, 504, "did not answer", "timeout"},
		{"busy", errUpstreamBusy, false, 503, "retry", "busy"},
		{"listing", &listingError{errors.New("not JSON")}, false, 502, "withheld", "bad_listing"},
		{"shutting down", errors.New("context canceled"), true, 503, "shutting down", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := NewMetrics()
			ctx, cancel := context.WithCancel(context.Background())
			if tc.closing {
				cancel()
			}
			defer cancel()
			s := &responder{metrics: m, log: slog.New(slog.DiscardHandler), closing: ctx}
			status, body := s.failure(tc.err, 15*time.Second)
			if status != tc.wantStatus || !strings.Contains(body, tc.wantInBody) {
				t.Errorf("failure = %d %q; want %d naming %q", status, body, tc.wantStatus, tc.wantInBody)
			}
			for _, reason := range []string{"unreachable", "timeout", "busy", "bad_listing"} {
				got := testutilCount(m.upstreamErrors.WithLabelValues(reason))
				if want := map[bool]float64{true: 1}[reason == tc.wantReason]; got != want {
					t.Errorf("counted %v under %s; want %v", got, reason, want)
				}
			}
		})
	}
}

// Every answer the proxy makes itself says it is Google's metadata flavor and is
// plain text.
func TestResponderAnswersAreLabelled(t *testing.T) {
	t.Parallel()
	m := NewMetrics()
	s := &responder{metrics: m, log: slog.New(slog.DiscardHandler), closing: context.Background(), releaseConn: func(*connInfo) {}}
	cs := testClients(Limits{})
	src := podSource("ns", "pod", "10.0.0.1")
	for _, tc := range []struct {
		name   string
		method string
		answer func(*exchange)
		status int
		inBody string
	}{
		{"concealed", "GET", func(x *exchange) { x.d = policy.Decision{Verdict: policy.Conceal}; s.blocked(x) }, 403, policy.ConcealedBody},
		{"concealed HEAD: no body", "HEAD", func(x *exchange) { x.d = policy.Decision{Verdict: policy.Conceal}; s.blocked(x) }, 403, ""},
		{"denied", "GET", func(x *exchange) { x.d = policy.Decision{Verdict: policy.Deny, Rule: policy.RuleMethod}; s.blocked(x) }, 403, "rule method"},
		{"pod limit", "GET", func(x *exchange) { s.refused(x, reasonPodLongPolls, 5, false) }, 429, "retry after 5 s"},
		{"node limit", "GET", func(x *exchange) { s.refused(x, reasonUpstreamLongPolls, 5, false) }, 503, "upstream limit"},
		{"body", "GET", func(x *exchange) { s.bodyRefused(x) }, 403, "request-body"},
		{"failed", "GET", func(x *exchange) { s.failed(x, errors.New("refused"), time.Second) }, 502, "unreachable"},
		{"withheld", "GET", func(x *exchange) { s.withheld(x, errors.New("bad")) }, 502, "withheld"},
		{"shutting down", "GET", func(x *exchange) { s.shuttingDown(x) }, 503, "shutting down"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			x := exchange{w: rec, r: httptest.NewRequest(tc.method, "/", nil), cl: cs.acquire(src), src: src}
			tc.answer(&x)
			if rec.Code != tc.status || rec.Header().Get("Metadata-Flavor") != "Google" ||
				!strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") || !strings.Contains(rec.Body.String(), tc.inBody) {
				t.Errorf("%d %v %q; want %d, Metadata-Flavor: Google, text/plain, naming %q", rec.Code, rec.Header(), rec.Body, tc.status, tc.inBody)
			}
			if tc.method == "HEAD" && rec.Body.Len() != 0 {
				t.Errorf("HEAD answered with a body %q", rec.Body)
			}
			if tc.status == 503 || tc.status == 429 {
				if rec.Header().Get("Retry-After") == "" {
					t.Error("no Retry-After")
				}
			}
		})
	}
}

// A flight's reply renders the same on a handler goroutine and on a hijacked
// connection.
func TestReplyRawMatchesWrite(t *testing.T) {
	t.Parallel()
	rp := reply{status: 200, header: http.Header{"Etag": {"abc"}, "Metadata-Flavor": {"Google"}, "Connection": {"keep-alive"}}, body: []byte("v")}
	raw := string(rp.raw(false))
	for _, want := range []string{"HTTP/1.1 200 OK\r\n", "Etag: abc\r\n", "Content-Length: 1\r\n", "Connection: close\r\n\r\nv"} {
		if !strings.Contains(raw, want) {
			t.Errorf("raw reply %q lacks %q", raw, want)
		}
	}
	if strings.Contains(raw, "keep-alive") {
		t.Errorf("raw reply %q carries a hop-by-hop header", raw)
	}
	failed := reply{errStatus: 504, errBody: "late\n"}
	if raw := string(failed.raw(true)); !strings.HasPrefix(raw, "HTTP/1.1 504") || strings.HasSuffix(raw, "late\n") {
		t.Errorf("raw failure to a HEAD %q; want 504 without body", raw)
	}
}

// The proxy's registry holds its own series only: process-wide collectors are the
// binary's (internal/proxyapp).
func TestMetricsRegisterNoProcessCollectors(t *testing.T) {
	t.Parallel()
	families, err := NewMetrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if !strings.HasPrefix(f.GetName(), "metaconceal_proxy_") {
			t.Errorf("NewMetrics registers %s", f.GetName())
		}
	}
}
