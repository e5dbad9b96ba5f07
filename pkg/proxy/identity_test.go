package proxy

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// notified records the pods the proxy asked to record Events on.
type notified struct {
	mu   sync.Mutex
	pods []string
}

func (n *notified) Blocked(pod podindex.Pod, _ policy.Decision) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.pods = append(n.pods, pod.Namespace+"/"+pod.Name)
}

func (n *notified) list() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.pods...)
}

// unattributedServer serves f's handler on a listener of the proxy's own port kind.
func unattributedServer(t *testing.T, f *fixture) string {
	t.Helper()
	srv := httptest.NewUnstartedServer(f.handler)
	srv.Config = NewServer(f.handler, f.handler.log)
	srv.Listener = f.handler.Listener(srv.Listener)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

// Events and audit lines name only attested pods (issue 17, part 7): a request from a
// recorded pod's address on the unattributed listener (what a forger reaches) is
// concealed, counted as unattributed, audited without a pod, and records no Event on
// the pod whose address it used; the same request on the attested listener names it.
func TestEventsAndAuditNameOnlyAttestedPods(t *testing.T) {
	t.Parallel()
	n := &notified{}
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) { c.Notify = n })
	kubeEnv := v1 + "instance/attributes/kube-env"
	if a := rawFrom(t, "127.0.0.1", unattributedServer(t, f), "GET", kubeEnv); a.status != http.StatusForbidden {
		t.Fatalf("unattributed kube-env: %d", a.status)
	}
	if got := n.list(); len(got) != 0 {
		t.Errorf("Events recorded for an unattributed request: %v", got)
	}
	logs := f.logs.String()
	if !strings.Contains(logs, `"pod_name":"","source_ip":"127.0.0.1","attested":false`) {
		t.Errorf("audit line of the unattributed request names a pod or is missing:\n%s", logs)
	}
	if !strings.Contains(logs, `"msg":"unattributed metadata requests: served as concealed, in one shared budget"`) {
		t.Errorf("no log line about unattributed requests:\n%s", logs)
	}
	m := scrape(t, f)
	for _, want := range []string{
		"metaconceal_proxy_unattributed_requests_total 1\n",
		`metaconceal_proxy_blocked_requests_by_namespace_total{namespace="unattributed",verdict="conceal"} 1`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q:\n%s", want, grepLines(m, "unattributed"))
		}
	}

	if a := rawFrom(t, "127.0.0.1", f.proxy.URL, "GET", kubeEnv); a.status != http.StatusForbidden {
		t.Fatalf("attested kube-env: %d", a.status)
	}
	if got := n.list(); len(got) != 1 || got[0] != "team-a/web-0" {
		t.Errorf("Events after an attested request: %v; want one on team-a/web-0", got)
	}
	if m := scrape(t, f); !strings.Contains(m, "metaconceal_proxy_unattributed_requests_total 1\n") {
		t.Errorf("an attested request was counted as unattributed:\n%s", grepLines(m, "unattributed"))
	}
}

// Every unattributed source shares one budget: requests from three addresses on the
// unattributed listener spend one pod's burst, and the attested pod keeps its own.
// Keyed by source address (before issue 17), each address had a burst of its own and
// the third request was answered.
func TestUnattributedSourcesShareOneBudget(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, func(c *Config) {
		c.Limits = Limits{PodRate: 0.001, PodBurst: 2}
	})
	base := unattributedServer(t, f)
	path := v1 + "project/project-id"
	for _, src := range []string{"127.0.0.3", "127.0.0.4"} {
		if a := rawFrom(t, src, base, "GET", path); a.status != http.StatusOK {
			t.Fatalf("unattributed request from %s: %d", src, a.status)
		}
	}
	if a := rawFrom(t, "127.0.0.5", base, "GET", path); a.status != http.StatusTooManyRequests {
		t.Errorf("a third unattributed address: %d; want 429 (one shared budget)", a.status)
	}
	if a := rawFrom(t, "127.0.0.1", f.proxy.URL, "GET", path); a.status != http.StatusOK {
		t.Errorf("the attested pod while the unattributed budget is spent: %d; want 200", a.status)
	}
}

// podKeyOf: attested sources are their pods, whatever their address; every other
// source is the one unattributed key.
func TestPodKeyOf(t *testing.T) {
	t.Parallel()
	web := podindex.Pod{Namespace: "team-a", Name: "web-0"}
	a, b := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	for _, tc := range []struct {
		x, y source
		same bool
	}{
		{source{addr: a}, source{addr: b}, true},
		{source{addr: a, pod: web}, source{addr: b}, true}, // a pod named but not attested counts for nothing
		{source{addr: a, pod: web, attested: true}, source{addr: b, pod: web, attested: true}, true},
		{source{addr: a, pod: web, attested: true}, source{addr: a}, false},
	} {
		if got := podKeyOf(tc.x) == podKeyOf(tc.y); got != tc.same {
			t.Errorf("podKeyOf(%+v) == podKeyOf(%+v): %v, want %v", tc.x, tc.y, got, tc.same)
		}
	}
}
