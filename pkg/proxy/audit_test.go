package proxy

import (
	"bytes"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

func testutilCount(c prometheus.Counter) float64 { return testutil.ToFloat64(c) }

type countingNotifier struct{ n atomic.Int32 }

func (c *countingNotifier) Blocked(podindex.Pod, policy.Decision) { c.n.Add(1) }

// The audit point: lines within the pod's audit rate, every block counted by
// namespace and told to the notifier, long fields clipped.
func TestAuditorBlocked(t *testing.T) {
	t.Parallel()
	var logs bytes.Buffer
	cs := testClients(Limits{})
	m := cs.metrics
	n := &countingNotifier{}
	a := &auditor{clients: cs, metrics: m, log: slog.New(slog.NewJSONHandler(&logs, nil)), notify: n}
	src := podSource("team-a", "web-0", "10.0.0.1")
	cl := cs.acquire(src)
	const sent = auditBurst + 5
	for range sent {
		r := httptest.NewRequest("GET", "/", nil)
		r.RequestURI = "/computeMetadata/v1/instance/attributes/kube-env?" + strings.Repeat("x", 1000)
		x := exchange{w: httptest.NewRecorder(), r: r, cl: cl, src: src,
			d: policy.Decision{Verdict: policy.Conceal, Rule: policy.RuleKubeEnv, Path: "/computeMetadata/v1/instance/attributes/kube-env"}}
		a.blocked(&x)
	}
	lines := strings.Count(logs.String(), "metadata request blocked")
	if lines != auditBurst {
		t.Errorf("%d audit lines for %d blocks; want the burst, %d", lines, sent, auditBurst)
	}
	if got := n.n.Load(); got != sent {
		t.Errorf("notifier told %d times; want %d", got, sent)
	}
	if got := testutilCount(m.blockedByNS.WithLabelValues("team-a", "conceal")); got != sent {
		t.Errorf("blocked by namespace %v; want %d", got, sent)
	}
	if got := testutilCount(m.auditDropped.WithLabelValues("team-a")); got != sent-auditBurst {
		t.Errorf("audit lines dropped %v; want %d", got, sent-auditBurst)
	}
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if len(line) > 2048 {
			t.Fatalf("audit line of %d bytes; want under 2 KiB", len(line))
		}
	}
}
