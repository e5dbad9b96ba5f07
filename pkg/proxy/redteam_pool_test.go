package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Wrong-client and shared-state attacks: an answer meant for one request must never
// reach another client, whatever the upstream sends and whoever shares a long poll.

// rawFrom is raw() from a chosen loopback source address (127.0.0.0/8 is all on lo),
// so that tests can play two pods.
func rawFrom(t *testing.T, src, base, method, target string) answer {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	conn, err := d.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Error(err)
		return answer{}
	}
	defer conn.Close()
	fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", method, target)
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Errorf("%s %s from %s: %v", method, target, src, err)
		return answer{}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, string(body), resp.Close}
}

// An exposed pod (served in full, recursive listings unfiltered) and a concealed pod
// asking the same recursive long poll must not share one upstream answer: the
// concealed pod would get the exposed pod's unfiltered listing, kube-env included.
func TestExposedAndConcealedPollsDoNotShareAnAnswer(t *testing.T) {
	t.Parallel()
	const exposedIP, concealedIP = "127.0.0.2", "127.0.0.1"
	f := newFixture(t, policy.RecursiveFilter, func(c *Config) {
		c.Pods = fixedPods{
			netip.MustParseAddr(exposedIP):   {Namespace: "kube-system", Name: "agent", Exposed: true},
			netip.MustParseAddr(concealedIP): {Namespace: "team-a", Name: "web-0"},
		}
	})
	etag := etagOf(t, f.proxy.URL, v1+"instance/attributes/")
	poll := v1 + "instance/attributes/?recursive=true&wait_for_change=true&timeout_sec=30&last_etag=" + etag

	exposed := make(chan answer, 1)
	exposedBase := exposedURL(t, f.handler)
	go func() { exposed <- rawFrom(t, exposedIP, exposedBase, "GET", poll) }()
	waitFor(t, "the exposed pod's poll to be held", func() bool { return f.fake.Waiting() == 1 })
	concealed := make(chan answer, 1)
	go func() { concealed <- rawFrom(t, concealedIP, f.proxy.URL, "GET", poll) }()
	waitFor(t, "both polls to be held", func() bool {
		return strings.Contains(scrape(t, f), "metaconceal_proxy_long_polls_open 2\n")
	})
	f.fake.Set("instance/attributes/changed", "yes")

	if a := <-exposed; a.status != 200 || !strings.Contains(a.body, fakegce.KubeEnvMarker) {
		t.Errorf("exposed pod's recursive poll: %d, want the full listing", a.status)
	}
	a := <-concealed
	if hasMarker(a.body) || strings.Contains(a.body, "kube-env") {
		t.Fatalf("concealed pod got the exposed pod's unfiltered listing: %d %q", a.status, a.body)
	}
	if a.status != 200 || !strings.Contains(a.body, "changed") {
		t.Errorf("concealed pod's recursive poll: %d %q, want the filtered listing", a.status, a.body)
	}
}

// scriptedUpstream answers each request on its connections with what answer
// returns, written raw, so a test can play an upstream that bends HTTP/1.1.
func scriptedUpstream(t *testing.T, answer func(r *http.Request) string) *url.URL {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				br := bufio.NewReader(conn)
				for {
					_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
					r, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					if _, err := io.WriteString(conn, answer(r)); err != nil {
						return
					}
				}
			}()
		}
	}()
	u, _ := url.Parse("http://" + ln.Addr().String())
	return u
}

func okAnswer(body string) string {
	return fmt.Sprintf("HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Type: application/text\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}

// Answers an upstream may legally (1xx) or wrongly (a body on HEAD, bytes after the
// body) send must not leave bytes on a pooled connection for the next client.
func TestUpstreamAnswersNeverReachTheWrongClient(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		method string // of the first request
		answer func(r *http.Request) string
	}{
		{"103 early hints before the answer", "GET", func(r *http.Request) string {
			return "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + okAnswer("answer for "+r.URL.Path)
		}},
		{"100 continue never asked for", "GET", func(r *http.Request) string {
			return "HTTP/1.1 100 Continue\r\n\r\n" + okAnswer("answer for "+r.URL.Path)
		}},
		{"101 never asked for", "GET", func(r *http.Request) string {
			return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + okAnswer("answer for "+r.URL.Path)
		}},
		{"more 1xx than any upstream sends", "GET", func(r *http.Request) string {
			return strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 10) + okAnswer("answer for "+r.URL.Path)
		}},
		{"body on HEAD", "HEAD", func(r *http.Request) string {
			return okAnswer("answer for " + r.URL.Path)
		}},
		{"bytes after the body", "GET", func(r *http.Request) string {
			return okAnswer("answer for "+r.URL.Path) + okAnswer("stray answer for "+r.URL.Path)
		}},
		{"body on 304", "GET", func(r *http.Request) string {
			body := "answer for " + r.URL.Path
			if strings.HasSuffix(r.URL.Path, "/first") {
				return fmt.Sprintf("HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n%s", len(body), body) + okAnswer("stray")
			}
			return okAnswer(body)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var mu sync.Mutex
			up := scriptedUpstream(t, func(r *http.Request) string {
				mu.Lock()
				defer mu.Unlock()
				if r.Method == "HEAD" || strings.HasSuffix(r.URL.Path, "/first") {
					return tc.answer(r)
				}
				return okAnswer("answer for " + r.URL.Path)
			})
			f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = up })
			first := raw(t, f.proxy.URL, tc.method, v1+"instance/attributes/first", flavor)
			if hasMarker(first.body) || strings.Contains(first.body, "second") {
				t.Errorf("first answer %q", first.body)
			}
			// Sequential requests reuse the pooled connection: the second client must
			// get its own answer or an error, never the first one's leftovers.
			for i := range 3 {
				a := raw(t, f.proxy.URL, "GET", v1+"instance/attributes/second", flavor)
				if a.status != 200 || a.body != "answer for "+v1+"instance/attributes/second" {
					t.Fatalf("request %d after a %s: %d %q, want its own answer", i, tc.name, a.status, a.body)
				}
			}
		})
	}
}

// Exposure is the listener's, never the record's: on the attested listener no source
// is served in full, not even one whose record says exposed; on the exposed listener a
// source the index knows is, and one it does not know is unattributed (concealed),
// whether it arrives as IPv4 or as IPv4-mapped IPv6 on a dual-stack listener.
func TestExposedOnlyOnTheExposedListener(t *testing.T) {
	t.Parallel()
	const kubeEnv = v1 + "instance/attributes/kube-env"
	pods := fixedPods{
		netip.MustParseAddr("127.0.0.2"): {Namespace: "kube-system", Name: "agent", Exposed: true},
		netip.MustParseAddr("127.0.0.3"): {Namespace: "team-a", Name: "web-0"},
	}
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Pods = pods })
	for _, src := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.1"} {
		a := rawFrom(t, src, f.proxy.URL, "GET", kubeEnv)
		if strings.Contains(a.body, fakegce.KubeEnvMarker) || a.status != http.StatusForbidden {
			t.Errorf("kube-env from %s on the attested listener: %d; want concealed", src, a.status)
		}
	}
	unattributed := httptest.NewUnstartedServer(f.handler)
	unattributed.Config = NewServer(f.handler, f.handler.log)
	unattributed.Listener = f.handler.Listener(unattributed.Listener)
	unattributed.Start()
	t.Cleanup(unattributed.Close)
	if a := rawFrom(t, "127.0.0.2", unattributed.URL, "GET", kubeEnv); a.status != http.StatusForbidden {
		t.Errorf("kube-env from the exposed pod's address on the unattributed listener: %d; want concealed", a.status)
	}

	// A dual-stack exposed listener sees IPv4 clients as ::ffff:a.b.c.d.
	ln, err := net.Listen("tcp", "[::]:0")
	if err != nil {
		t.Fatalf("dual-stack listener: %v (the test needs IPv6 on loopback)", err)
	}
	srv := NewServer(f.handler, f.handler.log)
	go func() { _ = srv.Serve(f.handler.ListenerFor(ln, podindex.Exposed)) }()
	t.Cleanup(func() { srv.Close() })
	port := ln.Addr().(*net.TCPAddr).Port
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for src, wantExposed := range map[string]bool{"127.0.0.2": true, "127.0.0.4": false} {
		a := rawFrom(t, src, base, "GET", kubeEnv)
		if got := strings.Contains(a.body, fakegce.KubeEnvMarker); got != wantExposed {
			t.Errorf("kube-env from %s via a dual-stack exposed listener: served %v (%d), want %v", src, got, a.status, wantExposed)
		}
	}
}

// The check for unsolicited bytes must not mistake an idle connection whose last
// request's deadline has passed for a broken one: pooled connections stay reusable
// for as long as the pool keeps them.
func TestIdleConnectionReusedAfterItsLastDeadline(t *testing.T) {
	t.Parallel()
	var conns atomic.Int32
	up := httptest.NewUnstartedServer(fakegce.New())
	up.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	up.Start()
	t.Cleanup(up.Close)
	u, _ := url.Parse(up.URL)
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Upstream = u; c.UpstreamTimeout = 50 * time.Millisecond })
	for i := range 3 {
		if i > 0 {
			time.Sleep(120 * time.Millisecond) // past the previous request's deadline
		}
		if a := raw(t, f.proxy.URL, "GET", v1+"project/project-id", flavor); a.status != 200 {
			t.Fatalf("request %d: %d %q", i, a.status, a.body)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("3 sequential requests opened %d upstream connections, want 1 reused", n)
	}
}
