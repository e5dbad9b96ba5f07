package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
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

// The cache's expiry is driven by an injected clock: the tests move time, never
// sleep. The scripted upstream mints tokens on the same clock, so that a test knows
// every token's true expiry.

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

const (
	tokenPath  = "/computeMetadata/v1/instance/service-accounts/default/token"
	projectID  = "/computeMetadata/v1/project/project-id"
	scopeCloud = "https://www.googleapis.com/auth/cloud-platform"
	scopeGCS   = "https://www.googleapis.com/auth/devstorage.read_only"
)

// scriptedGCE is an upstream whose every answer a test can tell apart: tokens name
// their serial number, alt and scopes; other values their serial number.
type scriptedGCE struct {
	clock    *fakeClock
	lifetime time.Duration
	// reuseUntil > 0: like GCE's metadata server, hand out the same token (per alt
	// and scopes) until less than reuseUntil of it remains.
	reuseUntil time.Duration

	mu      sync.Mutex
	serial  int
	expiry  map[string]time.Time // token -> its true expiry
	current map[string]string    // alt|scopes -> token (reuse mode)
	gate    chan struct{}        // non-nil: requests wait for it to close
	fail    int                  // non-zero: answer this status
	badBody string               // non-empty: answer 200 with this body

	requests atomic.Int64
	tokens   atomic.Int64 // token requests
}

func newScriptedGCE(clock *fakeClock) *scriptedGCE {
	return &scriptedGCE{clock: clock, lifetime: 3599 * time.Second, expiry: map[string]time.Time{}, current: map[string]string{}}
}

func (s *scriptedGCE) setGate(g chan struct{}) {
	s.mu.Lock()
	s.gate = g
	s.mu.Unlock()
}

func (s *scriptedGCE) setFail(status int, badBody string) {
	s.mu.Lock()
	s.fail, s.badBody = status, badBody
	s.mu.Unlock()
}

func (s *scriptedGCE) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Metadata-Flavor", "Google")
	h.Set("Server", "Metadata Server for VM")
	h.Set("X-Frame-Options", "SAMEORIGIN")
	if r.Header.Get("Metadata-Flavor") != "Google" {
		h.Set("Content-Type", "text/html; charset=UTF-8")
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, "Missing required header: Metadata-Flavor: Google.\n")
		return
	}
	s.requests.Add(1)
	isToken := strings.HasSuffix(r.URL.Path, "/token")
	if isToken {
		s.tokens.Add(1)
	}
	s.mu.Lock()
	gate := s.gate
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.serial++
	h.Set("ETag", fmt.Sprintf("etag-%d", s.serial))
	if s.fail != 0 {
		h.Set("Content-Type", "text/html; charset=UTF-8")
		w.WriteHeader(s.fail)
		fmt.Fprintf(w, "upstream failure %d\n", s.serial)
		return
	}
	if s.badBody != "" {
		h.Set("Content-Type", "application/json")
		io.WriteString(w, s.badBody)
		return
	}
	alt := r.URL.Query().Get("alt")
	now := s.clock.Now()
	switch {
	case isToken:
		scopes := r.URL.Query().Get("scopes")
		slot := alt + "|" + scopes
		tok := s.current[slot]
		if tok == "" || s.reuseUntil == 0 || s.expiry[tok].Sub(now) < s.reuseUntil {
			tok = fmt.Sprintf("ya29.t%d|alt=%s|scopes=%s", s.serial, alt, scopes)
			s.expiry[tok] = now.Add(s.lifetime)
			s.current[slot] = tok
		}
		left := int64(s.expiry[tok].Sub(now) / time.Second)
		if alt == "text" {
			h.Set("Content-Type", "application/text")
			fmt.Fprintf(w, "access_token %s\nexpires_in %d\ntoken_type Bearer\n", tok, left)
			return
		}
		h.Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"access_token":%q,"expires_in":%d,"token_type":"Bearer"}`, tok, left)
	case alt == "json":
		h.Set("Content-Type", "application/json")
		fmt.Fprintf(w, `"value-%d"`, s.serial)
	default:
		h.Set("Content-Type", "application/text")
		fmt.Fprintf(w, "value-%d", s.serial)
	}
}

func (s *scriptedGCE) expiryOf(tok string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.expiry[tok]
	return t, ok
}

// cachePolicy is the default policy; its query grammar allows scopes on token paths.
func cachePolicy(t *testing.T) *policy.Policy {
	t.Helper()
	p, err := policy.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if d := p.Evaluate("GET", tokenPath+"?scopes="+scopeCloud+","+scopeGCS, false); d.Verdict != policy.Allow {
		t.Fatalf("the policy refuses scopes on the token path: %s", d.Rule)
	}
	return p
}

type cacheFixture struct {
	clock   *fakeClock
	up      *scriptedGCE
	handler *Handler
	proxy   *httptest.Server
}

func newCacheFixture(t *testing.T, upstream http.Handler, clock *fakeClock, tweak func(*Config)) *cacheFixture {
	t.Helper()
	ts := httptest.NewServer(upstream)
	t.Cleanup(ts.Close)
	u, _ := url.Parse(ts.URL)
	cfg := Config{
		Upstream: u,
		Policy:   cachePolicy(t),
		Log:      slog.New(slog.DiscardHandler),
		Cache:    CacheConfig{Now: clock.Now},
	}
	if tweak != nil {
		tweak(&cfg)
	}
	h, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	srv := httptest.NewUnstartedServer(h)
	srv.Config = NewServer(h, cfg.Log)
	srv.Listener = h.ListenerFor(srv.Listener, podindex.Attested) // loopback plays the attested listener
	srv.Start()
	t.Cleanup(srv.Close)
	f := &cacheFixture{clock: clock, handler: h, proxy: srv}
	if s, ok := upstream.(*scriptedGCE); ok {
		f.up = s
	}
	return f
}

func newScriptedFixture(t *testing.T, tweak func(*Config)) *cacheFixture {
	clock := newFakeClock()
	return newCacheFixture(t, newScriptedGCE(clock), clock, tweak)
}

// get is one GET with Metadata-Flavor: Google; it waits for any background refresh
// the request started, so that what the next request sees is deterministic.
func (f *cacheFixture) get(t *testing.T, target string) answer {
	t.Helper()
	a := raw(t, f.proxy.URL, "GET", target, flavor)
	f.handler.cache.bg.Wait()
	return a
}

type tokenAnswer struct {
	token     string
	expiresIn int64
}

func parseTokenAnswer(t *testing.T, a answer) tokenAnswer {
	t.Helper()
	if a.status != 200 {
		t.Fatalf("token: %d %q", a.status, a.body)
	}
	if strings.HasPrefix(a.body, "{") {
		var v struct {
			AccessToken string `json:"access_token"`
			ExpiresIn   int64  `json:"expires_in"`
			TokenType   string `json:"token_type"`
		}
		if err := json.Unmarshal([]byte(a.body), &v); err != nil || v.TokenType != "Bearer" {
			t.Fatalf("token answer %q: %v", a.body, err)
		}
		return tokenAnswer{v.AccessToken, v.ExpiresIn}
	}
	var ta tokenAnswer
	for line := range strings.SplitSeq(strings.TrimSpace(a.body), "\n") {
		k, v, _ := strings.Cut(line, " ")
		switch k {
		case "access_token":
			ta.token = v
		case "expires_in":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("text token answer %q: %v", a.body, err)
			}
			ta.expiresIn = n
		}
	}
	if ta.token == "" {
		t.Fatalf("text token answer without a token: %q", a.body)
	}
	return ta
}

func TestCacheTable(t *testing.T) {
	t.Parallel()
	pol := cachePolicy(t)
	on, err := newAnswerCache(CacheConfig{}, NewMetrics())
	if err != nil {
		t.Fatal(err)
	}
	off, err := newAnswerCache(CacheConfig{Disabled: true}, NewMetrics())
	if err != nil {
		t.Fatal(err)
	}
	const v1 = "/computeMetadata/v1/"
	for _, tc := range []struct {
		target string
		want   cacheKind
	}{
		{v1 + "project/project-id", cacheFact},
		{v1 + "project/project-id?alt=json", cacheFact},
		{v1 + "project/project-id?ALT=Text", cacheFact},
		{v1 + "project/numeric-project-id", cacheFact},
		{v1 + "instance/id", cacheFact},
		{v1 + "instance/zone", cacheFact},
		{v1 + "instance/name", cacheFact},
		{v1 + "instance/hostname", cacheFact},
		{v1 + "instance/machine-type", cacheFact},
		{v1 + "instance/service-accounts/default/email", cacheFact},
		{v1 + "instance/service-accounts/node@p.iam.gserviceaccount.com/aliases", cacheFact},
		{v1 + "instance/service-accounts/default/token", cacheToken},
		{v1 + "instance/service-accounts/node@p.iam.gserviceaccount.com/token", cacheToken},
		{v1 + "instance/service-accounts/default/token?alt=text", cacheToken},
		{v1 + "instance/service-accounts/default/token?scopes=" + scopeCloud, cacheToken},
		{v1 + "instance/service-accounts/default/token?scopes=" + scopeCloud + "," + scopeGCS + "&alt=json", cacheToken},
		// Not in the table: never cached.
		{v1 + "project/project-id/", notCached},
		{v1 + "project/Project-ID", notCached},
		{v1 + "project/", notCached},
		{v1 + "project/attributes/enable-oslogin", notCached},
		{v1 + "instance/attributes/cluster-name", notCached},
		{v1 + "instance/tags", notCached},
		{v1 + "instance/maintenance-event", notCached},
		{v1 + "instance/network-interfaces/0/ip", notCached},
		{v1 + "instance/service-accounts/default/scopes", notCached},
		{v1 + "instance/service-accounts/default/", notCached},
		{v1 + "instance/service-accounts/default/token/", notCached},
		{v1 + "instance/service-accounts//token", notCached},
		{v1 + "instance/service-accounts/default/?recursive=true", notCached},
		{v1 + "project/project-id?wait_for_change=true", notCached},
		{v1 + "project/project-id?wait_for_change=false", notCached},
		{v1 + "instance/id?recursive=true", notCached},
		{"/", notCached},
		{"/computeMetadata/", notCached},
	} {
		d := pol.Evaluate("GET", tc.target, false)
		if d.Verdict != policy.Allow {
			if tc.want != notCached {
				t.Errorf("%s: the policy says %s, want it allowed", tc.target, d.Rule)
			}
			continue
		}
		if got := on.cacheKindOf(d); got != tc.want {
			t.Errorf("%s: cache kind %s, want %s", tc.target, got, tc.want)
		}
		if got := off.cacheKindOf(d); got != notCached {
			t.Errorf("%s with the cache off: cache kind %s, want none", tc.target, got)
		}
	}
	for _, bad := range []time.Duration{-time.Second, MaxFactTTL + time.Second} {
		if _, err := newAnswerCache(CacheConfig{FactTTL: bad}, NewMetrics()); err == nil {
			t.Errorf("cache TTL %s accepted", bad)
		}
	}
}

func TestParseToken(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, body string
		ok         bool
		expires    int64
	}{
		{"json", `{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}`, true, 3599},
		{"json spaced, nested, reordered", " {\n \"token_type\": \"Bearer\", \"x\": {\"expires_in\": [1, {\"a\": 2}]},\n \"expires_in\" : 120 , \"access_token\": \"t\"}\n", true, 120},
		{"text", "access_token ya29.x\nexpires_in 3599\ntoken_type Bearer\n", true, 3599},
		{"text without final newline", "access_token ya29.x\nexpires_in 17", true, 17},
		{"json no expires_in", `{"access_token":"ya29.x","token_type":"Bearer"}`, false, 0},
		{"json no access_token", `{"expires_in":3599}`, false, 0},
		{"json empty access_token", `{"access_token":"","expires_in":3599}`, false, 0},
		{"json duplicate expires_in", `{"access_token":"t","expires_in":3599,"expires_in":10}`, false, 0},
		{"json other-case expires_in", `{"access_token":"t","expires_in":3599,"Expires_In":10}`, false, 0},
		{"json float", `{"access_token":"t","expires_in":3599.5}`, false, 0},
		{"json exponent", `{"access_token":"t","expires_in":3e3}`, false, 0},
		{"json negative", `{"access_token":"t","expires_in":-5}`, false, 0},
		{"json zero", `{"access_token":"t","expires_in":0}`, false, 0},
		{"json string", `{"access_token":"t","expires_in":"3599"}`, false, 0},
		{"json longer than a day", `{"access_token":"t","expires_in":86401}`, false, 0},
		{"json trailing data", `{"access_token":"t","expires_in":3599}{}`, false, 0},
		{"json truncated", `{"access_token":"t","expires_in":3599`, false, 0},
		{"text duplicate", "access_token t\nexpires_in 5\nexpires_in 6\n", false, 0},
		{"text not a number", "access_token t\nexpires_in soon\n", false, 0},
		{"text no token", "expires_in 5\n", false, 0},
		{"empty", "", false, 0},
	} {
		tok, ok := parseToken([]byte(tc.body))
		if ok != tc.ok || tok.expiresIn != tc.expires {
			t.Errorf("%s: ok %v expires %d, want %v %d", tc.name, ok, tok.expiresIn, tc.ok, tc.expires)
			continue
		}
		if ok {
			if got := tc.body[tok.numStart:tok.numEnd]; got != strconv.FormatInt(tc.expires, 10) {
				t.Errorf("%s: the number's span is %q", tc.name, got)
			}
		}
	}
}

// TestTokenNeverServedPastMargin walks the clock through four hours of steady token
// requests and checks every answer against the token's true expiry.
func TestTokenNeverServedPastMargin(t *testing.T) {
	t.Parallel()
	for _, alt := range []string{"", "text"} {
		t.Run("alt="+alt, func(t *testing.T) {
			t.Parallel()
			f := newScriptedFixture(t, nil)
			target := tokenPath
			if alt != "" {
				target += "?alt=" + alt
			}
			lifetime := f.up.lifetime
			margin := tokenMargin(lifetime)
			seen := map[string]bool{}
			const step, total = 13 * time.Second, 4 * time.Hour
			for elapsed := time.Duration(0); elapsed < total; elapsed += step {
				before := f.up.tokens.Load()
				ta := parseTokenAnswer(t, f.get(t, target))
				fetched := f.up.tokens.Load() != before
				seen[ta.token] = true
				expiry, ok := f.up.expiryOf(ta.token)
				if !ok {
					t.Fatalf("served a token the upstream never minted: %q", ta.token)
				}
				left := expiry.Sub(f.clock.Now())
				if !fetched && left < margin {
					t.Fatalf("at +%s: cached token served with %s left, under its margin %s", elapsed, left, margin)
				}
				if want := int64(left / time.Second); ta.expiresIn != want {
					t.Fatalf("at +%s: expires_in %d, want the remaining %d", elapsed, ta.expiresIn, want)
				}
				if !strings.Contains(ta.token, "|alt="+alt+"|") {
					t.Fatalf("asked alt=%q, got %q", alt, ta.token)
				}
				f.clock.Advance(step)
			}
			// Each token was fetched once, in the background before its margin:
			// one upstream request per token lifetime, less the margin and the lead.
			perToken := lifetime - margin - tokenLead(lifetime)
			maxRequests := int64(total/perToken) + 1
			if got := f.up.tokens.Load(); got != int64(len(seen)) || got > maxRequests {
				t.Errorf("%d upstream token requests for %d distinct tokens in %s, want one per token and at most %d", got, len(seen), total, maxRequests)
			}
			if got := f.handler.cache.stats.refreshes[refreshRenewed].Load(); got != int64ToU(f.up.tokens.Load()-1) {
				t.Errorf("%d background renewals, want %d (every fetch but the first)", got, f.up.tokens.Load()-1)
			}
		})
	}
}

func int64ToU(v int64) uint64 { return uint64(max(v, 0)) }

// GCE's metadata server hands out the same token until close to its expiry. The cache
// then learns a shorter lifetime with each refresh, and still never serves a token
// from the cache under its margin.
func TestTokenFromReusingUpstream(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	up := newScriptedGCE(clock)
	up.reuseUntil = 4 * time.Minute
	f := newCacheFixture(t, up, clock, nil)
	const step, total = 7 * time.Second, 3 * time.Hour
	for elapsed := time.Duration(0); elapsed < total; elapsed += step {
		before := up.tokens.Load()
		ta := parseTokenAnswer(t, f.get(t, tokenPath))
		fetched := up.tokens.Load() != before
		expiry, _ := up.expiryOf(ta.token)
		left := expiry.Sub(clock.Now())
		if !fetched && left < tokenMarginMin {
			t.Fatalf("at +%s: cached token served with %s left", elapsed, left)
		}
		if ta.expiresIn != int64(left/time.Second) {
			t.Fatalf("at +%s: expires_in %d, want %d", elapsed, ta.expiresIn, int64(left/time.Second))
		}
		clock.Advance(step)
	}
	t.Logf("%d upstream token requests in %s against an upstream that reuses its token until %s before expiry", up.tokens.Load(), total, up.reuseUntil)
}

// While one refresh runs, the cached token is served at once, and no second refresh
// starts; past the margin, requests wait for that same refresh instead.
func TestTokenRefreshOnceInBackground(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	first := parseTokenAnswer(t, f.get(t, tokenPath))
	lifetime := f.up.lifetime
	f.clock.Advance(lifetime - tokenMargin(lifetime) - tokenLead(lifetime) + time.Second) // into the refresh window

	gate := make(chan struct{})
	f.up.setGate(gate)
	var wg sync.WaitGroup
	answers := make(chan tokenAnswer, 40)
	for range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers <- parseTokenAnswer(t, raw(t, f.proxy.URL, "GET", tokenPath, flavor))
		}()
	}
	wg.Wait() // all answered while the refresh is held upstream
	close(answers)
	for a := range answers {
		if a.token != first.token {
			t.Errorf("during the refresh: token %q, want the cached %q", a.token, first.token)
		}
	}
	waitFor(t, "the refresh to reach the upstream", func() bool { return f.up.tokens.Load() == 2 })

	// Past the margin, the cached token is no longer served: the request joins the
	// refresh in flight.
	f.clock.Advance(tokenLead(lifetime))
	late := make(chan tokenAnswer, 1)
	go func() { late <- parseTokenAnswer(t, raw(t, f.proxy.URL, "GET", tokenPath, flavor)) }()
	waitFor(t, "the late request to join the refresh", func() bool { return f.handler.cache.stats.coalesced.Load() == 1 })
	close(gate)
	got := <-late
	f.handler.cache.bg.Wait()
	if got.token == first.token {
		t.Errorf("past the margin: served the old token %q", got.token)
	}
	if n := f.up.tokens.Load(); n != 2 {
		t.Errorf("%d upstream token requests, want 2 (the first and one refresh)", n)
	}
	if again := parseTokenAnswer(t, f.get(t, tokenPath)); again.token != got.token {
		t.Errorf("after the refresh: %q, want the renewed %q", again.token, got.token)
	}
}

// Errors, refusals and answers that are not tokens pass through and are never kept;
// a failed refresh leaves the token served until its margin, never after.
func TestErrorsNeverCached(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	for _, status := range []int{500, 503, 404, 429} {
		f.up.setFail(status, "")
		for _, target := range []string{projectID, tokenPath} {
			before := f.up.requests.Load()
			a := f.get(t, target)
			if a.status != status || !strings.HasPrefix(a.body, "upstream failure") {
				t.Errorf("%s with the upstream answering %d: %d %q", target, status, a.status, a.body)
			}
			if f.up.requests.Load() != before+1 {
				t.Errorf("%s: the error was answered without asking the upstream", target)
			}
		}
	}
	f.up.setFail(0, `{"access_token":"no-expiry"}`)
	for range 2 {
		before := f.up.requests.Load()
		if a := f.get(t, tokenPath); a.status != 200 || a.body != `{"access_token":"no-expiry"}` {
			t.Errorf("token without expires_in: %d %q, want it passed on as it is", a.status, a.body)
		}
		if f.up.requests.Load() != before+1 {
			t.Error("a token answer without expires_in was cached")
		}
	}
	if n := len(f.handler.cache.entries); n != 0 {
		t.Errorf("%d entries cached from errors and bad answers", n)
	}

	// A token cached, then the upstream fails every refresh.
	f.up.setFail(0, "")
	good := parseTokenAnswer(t, f.get(t, tokenPath))
	lifetime := f.up.lifetime
	f.clock.Advance(lifetime - tokenMargin(lifetime) - tokenLead(lifetime) + time.Second)
	f.up.setFail(503, "")
	for range 3 {
		if a := parseTokenAnswer(t, f.get(t, tokenPath)); a.token != good.token {
			t.Errorf("refresh failing: %q, want the cached %q while it is inside its margin", a.token, good.token)
		}
		f.clock.Advance(refreshRetry)
	}
	if got := f.handler.cache.stats.refreshes[refreshFailed].Load(); got != 3 {
		t.Errorf("%d failed refreshes counted, want 3 (one per retry interval)", got)
	}
	f.clock.Advance(tokenLead(lifetime)) // past the margin
	if a := f.get(t, tokenPath); a.status != 503 {
		t.Errorf("past the margin with the upstream failing: %d %q, want the upstream's 503, never the old token", a.status, a.body)
	}
	f.up.setFail(0, "")
	if a := parseTokenAnswer(t, f.get(t, tokenPath)); a.token == good.token || a.expiresIn != int64(lifetime/time.Second) {
		t.Errorf("upstream back: %+v, want a fresh token", a)
	}
}

// Every scopes value and alt form is its own entry, including under concurrency.
func TestScopesAndAltNeverCross(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	type variant struct{ alt, scopes string }
	var variants []variant
	for _, alt := range []string{"", "json", "text"} {
		for _, scopes := range []string{"", scopeCloud, scopeGCS, scopeCloud + "," + scopeGCS, scopeGCS + "," + scopeCloud} {
			variants = append(variants, variant{alt, scopes})
		}
	}
	target := func(v variant) string {
		q := url.Values{}
		if v.alt != "" {
			q.Set("alt", v.alt)
		}
		if v.scopes != "" {
			q.Set("scopes", v.scopes)
		}
		s := tokenPath
		if len(q) > 0 {
			// Raw, the way client libraries send it (scopes URLs unescaped).
			var parts []string
			if v.alt != "" {
				parts = append(parts, "alt="+v.alt)
			}
			if v.scopes != "" {
				parts = append(parts, "scopes="+v.scopes)
			}
			s += "?" + strings.Join(parts, "&")
		}
		return s
	}
	var wg sync.WaitGroup
	for round := range 3 {
		for _, v := range variants {
			for range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ta := parseTokenAnswer(t, raw(t, f.proxy.URL, "GET", target(v), flavor))
					want := "|alt=" + v.alt + "|scopes=" + v.scopes
					if !strings.HasSuffix(ta.token, want) {
						t.Errorf("round %d, %s: got token %q, want one minted for %q", round, target(v), ta.token, want)
					}
				}()
			}
		}
		wg.Wait()
	}
	if n := f.up.tokens.Load(); n != int64(len(variants)) {
		t.Errorf("%d upstream token requests for %d variants asked 12 times each, want one each", n, len(variants))
	}

	// Facts: alt forms apart, and never served to a client the upstream would refuse.
	text, js := f.get(t, projectID), f.get(t, projectID+"?alt=json")
	if text.body == js.body || !strings.HasPrefix(js.body, `"`) || text.header.Get("Content-Type") == js.header.Get("Content-Type") {
		t.Errorf("alt forms crossed: text %q (%s), json %q (%s)", text.body, text.header.Get("Content-Type"), js.body, js.header.Get("Content-Type"))
	}
	if again := f.get(t, projectID+"?alt=text"); again.body == js.body {
		t.Errorf("alt=text got the alt=json answer %q", again.body)
	}
	for _, target := range []string{projectID, tokenPath} {
		if a := raw(t, f.proxy.URL, "GET", target, nil); a.status != 403 || !strings.Contains(a.body, "Missing required header") {
			t.Errorf("%s without Metadata-Flavor after it was cached: %d %q, want the upstream's 403", target, a.status, a.body)
		}
		if a := raw(t, f.proxy.URL, "GET", target, map[string]string{"Metadata-Flavor": "google"}); a.status != 403 {
			t.Errorf("%s with Metadata-Flavor: google after it was cached: %d, want the upstream's own answer (403)", target, a.status)
		}
	}
}

// A fact is served exactly as the upstream sent it, for its TTL and not a moment
// longer.
func TestFactTTLAndExactAnswer(t *testing.T) {
	t.Parallel()
	const ttl = 3 * time.Second
	f := newScriptedFixture(t, func(c *Config) { c.Cache.FactTTL = ttl })
	first := f.get(t, projectID)
	f.clock.Advance(ttl - time.Nanosecond)
	hit := f.get(t, projectID)
	if f.up.requests.Load() != 1 {
		t.Fatalf("%d upstream requests, want the second answered from the cache", f.up.requests.Load())
	}
	if hit.status != first.status || hit.body != first.body {
		t.Errorf("cached answer %d %q, upstream's was %d %q", hit.status, hit.body, first.status, first.body)
	}
	for name := range first.header {
		if name == "Date" {
			continue
		}
		if got, want := hit.header.Values(name), first.header.Values(name); strings.Join(got, "\x00") != strings.Join(want, "\x00") {
			t.Errorf("header %s: cached %q, upstream %q", name, got, want)
		}
	}
	for name := range hit.header {
		if first.header.Get(name) == "" {
			t.Errorf("cached answer added header %s", name)
		}
	}
	for _, name := range []string{"Metadata-Flavor", "Etag", "Content-Type", "Server"} {
		if hit.header.Get(name) == "" {
			t.Errorf("cached answer lacks %s", name)
		}
	}
	f.clock.Advance(time.Nanosecond)
	if again := f.get(t, projectID); again.body == first.body || f.up.requests.Load() != 2 {
		t.Errorf("at the TTL: %q after %d upstream requests, want a new upstream answer", again.body, f.up.requests.Load())
	}
}

// Concealed and denied requests are answered before the cache: they neither read nor
// fill it, and an exposed pod's full answers are never shared with a concealed pod.
func TestConcealedNeverTouchesCache(t *testing.T) {
	t.Parallel()
	fake := fakegce.New()
	var received atomic.Int64
	fake.OnRequest(func(*http.Request) { received.Add(1) })
	clock := newFakeClock()
	f := newCacheFixture(t, fake, clock, func(c *Config) {
		c.Pods = fixedPods{netip.MustParseAddr("127.0.0.2"): {Namespace: "kube-system", Name: "agent", Exposed: true}}
	})
	const v1 = "/computeMetadata/v1/"
	blocked := []string{
		v1 + "instance/attributes/kube-env",
		v1 + "instance/attributes/kube-env?alt=text",
		v1 + "instance/service-accounts/default/identity?audience=x",
		v1 + "instance/?recursive=true",
		"/0.1/meta-data/attributes/kube-env",
		"/computeMetadata/v1beta1/project/project-id",
	}
	for range 2 {
		for _, target := range blocked {
			a := rawFrom(t, "127.0.0.1", f.proxy.URL, "GET", target)
			if a.status != 403 || strings.Contains(a.body, fakegce.KubeEnvMarker) || strings.Contains(a.body, fakegce.IdentityTokenMarker) {
				t.Errorf("%s: %d %q", target, a.status, a.body)
			}
		}
	}
	s := f.handler.cache.stats
	if received.Load() != 0 || s.hits[cacheFact].Load()+s.hits[cacheToken].Load()+s.misses[cacheFact].Load()+s.misses[cacheToken].Load()+s.coalesced.Load() != 0 {
		t.Errorf("blocked requests touched the upstream (%d) or the cache", received.Load())
	}
	// The exposed pod reads kube-env in full, twice: both go upstream (never cached),
	// and the concealed pod asking next is still refused.
	for range 2 {
		if a := rawFrom(t, "127.0.0.2", exposedURL(t, f.handler), "GET", v1+"instance/attributes/kube-env"); a.status != 200 || !strings.Contains(a.body, fakegce.KubeEnvMarker) {
			t.Errorf("exposed pod's kube-env: %d", a.status)
		}
		if a := rawFrom(t, "127.0.0.1", f.proxy.URL, "GET", v1+"instance/attributes/kube-env"); a.status != 403 || strings.Contains(a.body, fakegce.KubeEnvMarker) {
			t.Errorf("concealed pod after the exposed one: %d %q", a.status, a.body)
		}
	}
	if received.Load() != 2 || len(f.handler.cache.entries) != 0 {
		t.Errorf("exposed kube-env: %d upstream requests, %d entries; want 2 and none kept", received.Load(), len(f.handler.cache.entries))
	}
}

// 1,000 clients asking a cold proxy for a token at once make one upstream request.
func TestColdBurstCoalesced(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	gate := make(chan struct{})
	f.up.setGate(gate)
	const n = 1000
	var wg sync.WaitGroup
	tokens := make(chan string, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tokens <- parseTokenAnswer(t, raw(t, f.proxy.URL, "GET", tokenPath, flavor)).token
		}()
	}
	waitFor(t, "999 clients to join the first one's request", func() bool { return f.handler.cache.stats.coalesced.Load() == n-1 })
	close(gate)
	wg.Wait()
	close(tokens)
	first := ""
	for tok := range tokens {
		if first == "" {
			first = tok
		}
		if tok != first {
			t.Fatalf("burst answers differ: %q and %q", first, tok)
		}
	}
	if got := f.up.tokens.Load(); got != 1 {
		t.Errorf("%d upstream token requests for a burst of %d, want 1", got, n)
	}
	// Uncached paths are coalesced too.
	gate = make(chan struct{})
	f.up.setGate(gate)
	const attr = "/computeMetadata/v1/instance/attributes/cluster-name"
	bodies := make(chan string, 50)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bodies <- raw(t, f.proxy.URL, "GET", attr, flavor).body
		}()
	}
	waitFor(t, "49 clients to join", func() bool { return f.handler.cache.stats.coalesced.Load() == n-1+49 })
	close(gate)
	wg.Wait()
	close(bodies)
	for b := range bodies {
		if b != "value-2" {
			t.Errorf("coalesced attribute answer %q, want value-2", b)
		}
	}
	if got := f.up.requests.Load(); got != 2 {
		t.Errorf("%d upstream requests, want 2", got)
	}
	if _, cached := f.handler.cache.entries[reqKey{path: attr, host: "metadata.google.internal", flavor: "Google", flags: keyFlavor}]; cached || len(f.handler.cache.entries) != 1 {
		t.Errorf("an attribute was cached: %d entries", len(f.handler.cache.entries))
	}
}

// A coalesced client that leaves does not cancel the request for the others.
func TestCoalescedClientLeaving(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	gate := make(chan struct{})
	f.up.setGate(gate)
	const attr = "/computeMetadata/v1/instance/attributes/cluster-name"
	ctx, cancel := context.WithCancel(context.Background())
	leader := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", f.proxy.URL+attr, nil)
		req.Header.Set("Metadata-Flavor", "Google")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		leader <- err
	}()
	waitFor(t, "the first request upstream", func() bool { return f.up.requests.Load() == 1 })
	other := make(chan answer, 1)
	go func() { other <- raw(t, f.proxy.URL, "GET", attr, flavor) }()
	waitFor(t, "the second client to join", func() bool { return f.handler.cache.stats.coalesced.Load() == 1 })
	cancel()
	<-leader
	close(gate)
	if a := <-other; a.status != 200 || a.body != "value-1" {
		t.Errorf("the remaining client got %d %q after the first left", a.status, a.body)
	}
}

func TestCacheDisabled(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, func(c *Config) { c.Cache.Disabled = true })
	for i := range 3 {
		if a := f.get(t, projectID); a.body != fmt.Sprintf("value-%d", 2*i+1) {
			t.Errorf("request %d with the cache off: %q", i, a.body)
		}
		parseTokenAnswer(t, f.get(t, tokenPath))
	}
	if got := f.up.requests.Load(); got != 6 {
		t.Errorf("%d upstream requests for 6 with the cache off", got)
	}
}

func TestCacheMetrics(t *testing.T) {
	t.Parallel()
	f := newScriptedFixture(t, nil)
	f.get(t, projectID)
	f.get(t, projectID)
	f.get(t, tokenPath)
	f.get(t, tokenPath)
	f.get(t, tokenPath)
	lifetime := f.up.lifetime
	f.clock.Advance(lifetime - tokenMargin(lifetime) - tokenLead(lifetime))
	f.get(t, tokenPath) // starts a refresh
	rec := httptest.NewRecorder()
	AdminMux(f.handler).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	m := rec.Body.String()
	for _, want := range []string{
		`metaconceal_proxy_cache_hits_total{kind="fact"} 1`,
		`metaconceal_proxy_cache_hits_total{kind="token"} 3`,
		`metaconceal_proxy_cache_misses_total{kind="fact"} 1`,
		`metaconceal_proxy_cache_misses_total{kind="token"} 1`,
		`metaconceal_proxy_cache_refreshes_total{result="renewed"} 1`,
		`metaconceal_proxy_cache_refreshes_total{result="failed"} 0`,
		`metaconceal_proxy_coalesced_requests_total 0`,
		`metaconceal_proxy_upstream_requests_saved_total 4`,
		`metaconceal_proxy_cache_entries 2`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "cache"))
		}
	}
}

// The cache is on by default: FuzzProxyNeverLeaksConcealed (pkg/policy), which builds
// its handlers from a zero CacheConfig, fuzzes concealment with the cache in place.
func TestCacheOnByDefault(t *testing.T) {
	t.Parallel()
	pol, _ := policy.New(policy.Config{})
	h, err := New(Config{Upstream: &url.URL{Scheme: "http", Host: "127.0.0.1:1"}, Policy: pol})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.cache == nil || h.cache.disabled || h.cache.factTTL != DefaultFactTTL {
		t.Errorf("default cache: %+v", h.cache)
	}
}

// The cache table is mirrored in docs/proxy.md: every row's path and reason.
func TestCacheTableMirroredInDocs(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "proxy.md"))
	if err != nil {
		t.Fatalf("docs/proxy.md: %v", err)
	}
	for _, row := range CacheTable {
		if !strings.Contains(string(doc), "`"+row.Path+"`") || !strings.Contains(string(doc), row.Reason) || !strings.Contains(string(doc), row.Lifetime) {
			t.Errorf("docs/proxy.md does not mirror the cache table row %s (%q)", row.Path, row.Reason)
		}
	}
	if !strings.Contains(string(doc), NotCachedReason) {
		t.Error("docs/proxy.md lacks the table's last row (everything else)")
	}
}

// Fairness, on the cache directly: which entries stay after a sequence of stores
// by pods A, B and C. Steps: "A+k" pod A stores the fact k, "A+k!" the token k,
// "touch k" serves k, "wait 11s" moves the clock (facts live DefaultFactTTL, 10 s;
// tokens an hour).
func TestCacheFairEviction(t *testing.T) {
	t.Parallel()
	tokenBody := []byte(`{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}`)
	for _, tc := range []struct {
		name              string
		maxEntries, bound int
		steps             []string
		want              string // the keys left, sorted, and the entries charged per pod
	}{
		{"a pod at its bound evicts its own least recently served entry", 8, 2,
			[]string{"B+b1", "A+a1", "wait 1s", "A+a2", "wait 1s", "touch a1", "A+a3"},
			"a1 a3 b1 | A=2 B=1"},
		{"a full cache evicts from the pod holding the most", 4, 3,
			[]string{"A+a1", "A+a2", "wait 1s", "touch a1", "A+a3", "B+b1", "C+c1"},
			"a1 a3 b1 c1 | A=2 B=1 C=1"},
		{"a pod holding as many as any other evicts its own", 4, 3,
			[]string{"A+a1", "A+a2", "B+b1", "wait 1s", "B+b2", "B+b3"},
			"a1 a2 b2 b3 | A=2 B=2"},
		{"an entry past its lifetime goes before the least recently served", 8, 2,
			[]string{"A+a1!", "wait 1s", "A+a2", "wait 10s", "A+a3"},
			"a1 a3 | A=2"},
		{"a replaced entry stays charged to the pod that added it", 8, 2,
			[]string{"A+k1!", "B+k1!", "B+b1", "B+b2"},
			"b1 b2 k1 | A=1 B=2"},
		{"10,000 distinct keys from one pod leave the others' entries", 1024, 128,
			append([]string{"B+b1!", "C+c1"}, manyStores("A", 10000)...),
			"b1 c1 +128 of A | A=128 B=1 C=1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := newFakeClock()
			c, err := newAnswerCache(CacheConfig{Now: clock.Now, MaxEntries: tc.maxEntries, MaxEntriesPerPod: tc.bound}, NewMetrics())
			if err != nil {
				t.Fatal(err)
			}
			pods := map[string]podKey{}
			for _, p := range []string{"A", "B", "C"} {
				pods[p] = podKey{namespace: "ns", name: p}
			}
			key := func(name string) reqKey { return reqKey{path: "/computeMetadata/v1/" + name} }
			for _, step := range tc.steps {
				switch {
				case strings.HasPrefix(step, "wait "):
					d, err := time.ParseDuration(strings.TrimPrefix(step, "wait "))
					if err != nil {
						t.Fatal(err)
					}
					clock.Advance(d)
				case strings.HasPrefix(step, "touch "):
					c.get(key(strings.TrimPrefix(step, "touch "))).touch(clock.Now())
				default:
					pod, k, _ := strings.Cut(step, "+")
					name, isToken := strings.CutSuffix(k, "!")
					kind, body := cacheFact, []byte("v")
					if isToken {
						kind, body = cacheToken, tokenBody
					}
					if !c.store(key(name), kind, http.Header{}, body, clock.Now(), pods[pod]) {
						t.Fatalf("%s: not stored", step)
					}
				}
			}
			var left []string
			many := 0
			for k := range c.entries {
				name := strings.TrimPrefix(k.path, "/computeMetadata/v1/")
				if strings.HasPrefix(name, "many-") {
					many++
					continue
				}
				left = append(left, name)
			}
			slices.Sort(left)
			got := strings.Join(left, " ")
			if many > 0 {
				got += fmt.Sprintf(" +%d of A", many)
			}
			var charged []string
			total := 0
			for _, p := range []string{"A", "B", "C"} {
				if n := len(c.byPod[pods[p]]); n > 0 {
					charged = append(charged, fmt.Sprintf("%s=%d", p, n))
					total += n
				}
			}
			got += " | " + strings.Join(charged, " ")
			if got != tc.want {
				t.Errorf("left %q, want %q", got, tc.want)
			}
			if total != len(c.entries) || len(c.entries) > tc.maxEntries {
				t.Errorf("%d entries, %d charged to pods, cache bound %d", len(c.entries), total, tc.maxEntries)
			}
		})
	}
}

func manyStores(pod string, n int) []string {
	steps := make([]string, n)
	for i := range steps {
		steps[i] = fmt.Sprintf("%s+many-%d", pod, i)
	}
	return steps
}

// countingUpstream counts the requests for each request target.
type countingUpstream struct {
	next http.Handler
	mu   sync.Mutex
	n    map[string]int
}

func (c *countingUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.n[r.URL.RequestURI()]++
	c.mu.Unlock()
	c.next.ServeHTTP(w, r)
}

func (c *countingUpstream) count(target string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[target]
}

// Issue 17 part 6: one pod spelling 10,000 distinct cacheable keys (the scopes of a
// token) does not stop another pod's token requests from being answered from the
// cache: its token goes upstream once, whether it was first asked before, amid or
// after the flood. Before the cache had a bound per pod, the flood filled the shared
// table and every later token request went upstream.
func TestCacheFloodByOnePod(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	up := &countingUpstream{next: newScriptedGCE(clock), n: map[string]int{}}
	f := newCacheFixture(t, up, clock, twoPods)
	attacker := dialFrom(t, "127.0.0.1", f.proxy.URL)
	flood := func(from, to int) {
		for i := from; i < to; i++ {
			target := fmt.Sprintf("%s?scopes=%s/flood-%d", tokenPath, "https://www.googleapis.com/auth", i)
			if a := attacker.get(target); a.status != 200 {
				t.Fatalf("flood request %d: %d %q", i, a.status, a.body)
			}
		}
	}
	victimToken := tokenPath + "?scopes=" + scopeCloud
	var tokens []string
	ask := func() { // a new connection each time: an idle one may have been closed
		tokens = append(tokens, parseTokenAnswer(t, dialFrom(t, "127.0.0.2", f.proxy.URL).get(victimToken)).token)
	}
	flood(0, 5000)
	ask() // the cache already holds the flood's entries
	flood(5000, 10000)
	for range 5 {
		ask()
	}
	if n := up.count(victimToken); n != 1 {
		t.Errorf("the other pod's token went upstream %d times, want 1", n)
	}
	for _, tok := range tokens[1:] {
		if tok != tokens[0] {
			t.Errorf("tokens %q: want the cached one each time", tokens)
			break
		}
	}
	m := scrapeHandler(t, f.handler)
	if !strings.Contains(m, `metaconceal_proxy_cache_evictions_total{reason="pod_bound"} `+strconv.Itoa(10000-DefaultMaxCacheEntries/DefaultCachePodShareDiv)) {
		t.Errorf("evictions not counted:\n%s", grepLines(m, "cache_evictions"))
	}
}

func scrapeHandler(t *testing.T, h *Handler) string {
	t.Helper()
	rec := httptest.NewRecorder()
	AdminMux(h).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("/metrics: %d", rec.Code)
	}
	return rec.Body.String()
}

// BenchmarkCacheGet is the cache's cost on a hit: the lookup and, since the cache
// evicts the least recently served, recording the hit (go test -bench CacheGet).
func BenchmarkCacheGet(b *testing.B) {
	c, err := newAnswerCache(CacheConfig{}, NewMetrics())
	if err != nil {
		b.Fatal(err)
	}
	k := reqKey{path: tokenPath}
	body := []byte(`{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}`)
	if !c.store(k, cacheToken, http.Header{}, body, time.Now(), podKey{name: "a"}) {
		b.Fatal("not stored")
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			now := c.now()
			e := c.get(k)
			if e == nil {
				b.Fatal("miss")
			}
			e.touch(now)
		}
	})
}

// BenchmarkCacheStore is the cost of keeping a new answer when the cache is full
// (every store makes room): one pod storing distinct keys, as in a flood.
func BenchmarkCacheStore(b *testing.B) {
	c, err := newAnswerCache(CacheConfig{}, NewMetrics())
	if err != nil {
		b.Fatal(err)
	}
	other, flooder := podKey{name: "b"}, podKey{name: "a"}
	for i := range DefaultMaxCacheEntries {
		who := other
		if i%8 == 0 {
			who = flooder
		}
		c.store(reqKey{path: fmt.Sprintf("/computeMetadata/v1/project/k%d", i)}, cacheFact, http.Header{}, []byte("v"), time.Now(), who)
	}
	keys := make([]reqKey, 4096)
	for i := range keys {
		keys[i] = reqKey{path: fmt.Sprintf("/computeMetadata/v1/project/flood-%d", i)}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		c.store(keys[i%len(keys)], cacheFact, http.Header{}, []byte("v"), time.Now(), flooder)
	}
}
