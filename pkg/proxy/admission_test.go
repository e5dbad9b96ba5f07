package proxy

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

func testClients(l Limits) *clients {
	return newClients(l, NewMetrics(), slog.New(slog.DiscardHandler))
}

func podSource(ns, name, ip string) source {
	a := netip.MustParseAddr(ip)
	return source{ip: ip, addr: a, pod: podindex.Pod{Namespace: ns, Name: name}, attested: true}
}

// The request limiter: a burst, then the rate; a refusal says when to come back.
func TestClientAllow(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1_000_000, 0)
	for _, tc := range []struct {
		name      string
		rate      float64
		burst     int
		requests  int           // sent at t0
		after     time.Duration // then one more at t0+after
		wantOK    bool
		wantRetry int
	}{
		{"within the burst", 10, 5, 4, 0, true, 0},
		{"past the burst", 10, 5, 5, 0, false, 1},
		{"a token back after 1/rate", 10, 5, 5, 100 * time.Millisecond, true, 0},
		{"a slow rate: retry after whole seconds", 0.25, 1, 1, 0, false, 4},
		{"a slow rate, partly refilled", 0.25, 1, 1, 1500 * time.Millisecond, false, 3},
		{"no rate: never refused", 0, 0, 1000, 0, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cs := testClients(Limits{PodRate: tc.rate, PodBurst: tc.burst})
			c := cs.acquire(podSource("ns", "pod", "10.0.0.1"))
			for i := range tc.requests {
				if ok, _ := c.allow(t0); !ok {
					t.Fatalf("request %d of the first %d refused", i+1, tc.requests)
				}
			}
			ok, retry := c.allow(t0.Add(tc.after))
			if ok != tc.wantOK || retry != tc.wantRetry {
				t.Errorf("allow = %v, retry %d; want %v, %d", ok, retry, tc.wantOK, tc.wantRetry)
			}
		})
	}
}

// Audit lines: a burst, then the audit rate; the first line after drops counts them.
func TestAllowAuditCountsDrops(t *testing.T) {
	t.Parallel()
	cs := testClients(Limits{})
	c := cs.acquire(podSource("ns", "pod", "10.0.0.1"))
	now := time.Now()
	for i := range auditBurst {
		if ok, _ := cs.allowAudit(c, now); !ok {
			t.Fatalf("audit line %d of the burst dropped", i+1)
		}
	}
	for range 3 {
		if ok, _ := cs.allowAudit(c, now); ok {
			t.Fatal("audit line past the burst allowed")
		}
	}
	ok, dropped := cs.allowAudit(c, now.Add(time.Second/auditRate))
	if !ok || dropped != 3 {
		t.Errorf("after a refill: allowed %v, dropped before %d; want true, 3", ok, dropped)
	}
}

// Idle clients whose limiters are full again are forgotten; busy ones are kept.
func TestSweepForgetsIdleClients(t *testing.T) {
	t.Parallel()
	cs := testClients(Limits{PodRate: 1, PodBurst: 1})
	idle := cs.acquire(podSource("ns", "idle", "10.0.0.1"))
	cs.release(idle)
	busy := cs.acquire(podSource("ns", "busy", "10.0.0.2"))
	drained := cs.acquire(podSource("ns", "drained", "10.0.0.3"))
	cs.release(drained)
	now := time.Now()
	drained.allow(now)
	cs.sweep(now)
	_, idleKept := cs.byKey[idle.key]
	_, busyKept := cs.byKey[busy.key]
	_, drainedKept := cs.byKey[drained.key]
	if idleKept || !busyKept || !drainedKept {
		t.Errorf("kept idle %v, busy %v, drained (bucket not full) %v; want false, true, true", idleKept, busyKept, drainedKept)
	}
}

// admit answers what it does not let through, and lets the rest through untouched.
func TestAdmit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		body       string
		over       bool // the connection was opened over the pod's cap
		exhausted  bool // the pod's request limiter is empty
		wantStatus int  // 0: let through
		wantInBody string
	}{
		{"an ordinary request", "", false, false, 0, ""},
		{"a body", "x", false, false, http.StatusForbidden, "request-body"},
		{"over the connection cap", "", true, false, http.StatusTooManyRequests, reasonPodConns},
		{"over the request rate", "", false, true, http.StatusTooManyRequests, reasonRate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := NewMetrics()
			log := slog.New(slog.DiscardHandler)
			cs := newClients(Limits{PodRate: 1, PodBurst: 1}, m, log)
			resp := &responder{metrics: m, log: log, releaseConn: func(*connInfo) {}}
			a := admission{clients: cs, metrics: m, respond: resp, audit: &auditor{clients: cs, metrics: m, log: log}}
			src := podSource("ns", "pod", "10.0.0.1")
			cl := cs.acquire(src)
			if tc.exhausted {
				cl.allow(time.Now())
			}
			r := httptest.NewRequest("GET", "/computeMetadata/v1/project/project-id", strings.NewReader(tc.body))
			if tc.body == "" {
				r.Body, r.ContentLength = http.NoBody, 0
			}
			rec := httptest.NewRecorder()
			x := exchange{w: rec, r: r, cl: cl, src: src}
			if tc.over {
				x.conn = &connInfo{client: cl, src: src, over: true}
			}
			admitted := a.admit(&x)
			if admitted != (tc.wantStatus == 0) {
				t.Fatalf("admitted = %v; want %v", admitted, tc.wantStatus == 0)
			}
			if tc.wantStatus == 0 {
				if rec.Code != http.StatusOK || rec.Body.Len() != 0 {
					t.Errorf("an admitted request was answered: %d %q", rec.Code, rec.Body)
				}
				return
			}
			if rec.Code != tc.wantStatus || !strings.Contains(rec.Body.String(), tc.wantInBody) || rec.Header().Get("Metadata-Flavor") != "Google" {
				t.Errorf("answer %d %q; want %d naming %q", rec.Code, rec.Body, tc.wantStatus, tc.wantInBody)
			}
		})
	}
}
