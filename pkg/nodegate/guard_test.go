package nodegate

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/metaconceal/metaconceal/pkg/selftest"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// TestGuardReporter: the condition follows each outcome (True/False/Unknown with the
// state as reason), its transition time moves only when the status changes, a Warning
// Event is recorded each time it becomes False (not while it stays False), and the
// gauge names the pod.
func TestGuardReporter(t *testing.T) {
	t.Parallel()
	other := corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady"}
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{other}}})
	reg := prometheus.NewRegistry()
	clock := time.Date(2026, 12, 5, 15, 0, 0, 0, time.UTC)
	r := &GuardReporter{Client: client, Node: "n1", Effective: NewGuardGauge(reg), now: func() time.Time { return clock }}

	steps := []struct {
		o          selftest.Outcome
		status     corev1.ConditionStatus
		events     int
		gauge      string
		transition bool
	}{
		{selftest.Outcome{State: selftest.StateNotTested, Detail: "no concealed pod runs on this node yet"}, corev1.ConditionUnknown, 0, "", true},
		{selftest.Outcome{State: selftest.StateEffective, Pod: "team/a", Verdict: selftest.Effective}, corev1.ConditionTrue, 0, `metaconceal_guard_effective{pod="team/a"} 1`, true},
		{selftest.Outcome{State: selftest.StateEffective, Pod: "team/a", Verdict: selftest.Effective}, corev1.ConditionTrue, 0, `metaconceal_guard_effective{pod="team/a"} 1`, false},
		{selftest.Outcome{State: selftest.StateBypassed, Pod: "team/b", Verdict: selftest.Bypassed, Status: "HTTP/1.1 404 Not Found"}, corev1.ConditionFalse, 1, `metaconceal_guard_effective{pod="team/b"} 0`, true},
		{selftest.Outcome{State: selftest.StateBypassed, Pod: "team/b", Verdict: selftest.Bypassed, Status: "HTTP/1.1 404 Not Found"}, corev1.ConditionFalse, 1, `metaconceal_guard_effective{pod="team/b"} 0`, false},
		{selftest.Outcome{State: selftest.StateEffective, Pod: "team/a", Verdict: selftest.Blocked, Detail: "reset"}, corev1.ConditionTrue, 1, `metaconceal_guard_effective{pod="team/a"} 1`, true},
		{selftest.Outcome{State: selftest.StateBypassed, Pod: "team/a", Verdict: selftest.Bypassed, Status: "HTTP/1.1 404 Not Found"}, corev1.ConditionFalse, 2, `metaconceal_guard_effective{pod="team/a"} 0`, true},
	}
	var lastTransition metav1.Time
	for i, s := range steps {
		clock = clock.Add(time.Minute)
		r.Report(context.Background(), s.o)
		node, err := client.CoreV1().Nodes().Get(context.Background(), "n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var got *corev1.NodeCondition
		for j := range node.Status.Conditions {
			if node.Status.Conditions[j].Type == GuardCondition {
				got = &node.Status.Conditions[j]
			}
		}
		if got == nil || got.Status != s.status || got.Reason != string(s.o.State) || got.Message != s.o.Message() {
			t.Fatalf("step %d: condition %+v; want %s %s %q", i, got, s.status, s.o.State, s.o.Message())
		}
		if len(node.Status.Conditions) != 2 || !slices.ContainsFunc(node.Status.Conditions, func(c corev1.NodeCondition) bool { return c == other }) {
			t.Errorf("step %d: the other conditions changed: %+v", i, node.Status.Conditions)
		}
		if moved := !got.LastTransitionTime.Equal(&lastTransition); moved != s.transition {
			t.Errorf("step %d: transition time moved %v, want %v", i, moved, s.transition)
		}
		lastTransition = got.LastTransitionTime
		evs, err := client.CoreV1().Events(metav1.NamespaceDefault).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) != s.events {
			t.Errorf("step %d: %d Events, want %d", i, len(evs.Items), s.events)
		}
		for _, e := range evs.Items {
			if e.Type != corev1.EventTypeWarning || e.Reason != EventBypassed || e.InvolvedObject.Kind != "Node" || e.InvolvedObject.Name != "n1" {
				t.Errorf("step %d: Event %+v", i, e)
			}
		}
		metrics, err := testutil.CollectAndFormat(r.Effective, expfmt.TypeTextPlain, "metaconceal_guard_effective")
		if err != nil {
			t.Fatal(err)
		}
		series := 0
		for l := range strings.SplitSeq(string(metrics), "\n") {
			if strings.HasPrefix(l, "metaconceal_guard_effective{") {
				series++
			}
		}
		if (s.gauge == "" && series != 0) || (s.gauge != "" && (series != 1 || !strings.Contains(string(metrics), s.gauge))) {
			t.Errorf("step %d: gauge\n%s\nwant only %q", i, metrics, s.gauge)
		}
	}
}

// TestGuardCheck: before the gate first opens the self-test keeps it closed until its
// first round, and while the guard is bypassed; once the gate opened, never.
func TestGuardCheck(t *testing.T) {
	t.Parallel()
	m, err := selftest.NewMonitor(selftest.MonitorConfig{StateDir: t.TempDir(), Interval: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var opened atomic.Bool
	check := GuardCheck(m, &opened)
	if err := check.Probe(context.Background()); err == nil || !strings.Contains(err.Error(), "not run yet") {
		t.Errorf("before the first round: %v; want it failing", err)
	}
	m.Step(context.Background()) // no concealed pod: NotTested does not hold the gate
	if err := check.Probe(context.Background()); err != nil {
		t.Errorf("not tested: %v; want it passing", err)
	}
	if check.Keep {
		t.Error("the self-test check must not close an open gate (Keep)")
	}
}

func TestGuardCheckBypassed(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	netns := filepath.Join(dir, "netns")
	if err := os.WriteFile(netns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	rec := state.NewRecord(state.Attachment{Network: "n", ContainerID: "c1", IfName: "eth0", Netns: netns},
		state.PodRef{Namespace: "team", Name: "web"}, []netip.Addr{netip.MustParseAddr("10.0.0.2")}, "")
	if err := state.Write(dir, rec); err != nil {
		t.Fatal(err)
	}
	m, err := selftest.NewMonitor(selftest.MonitorConfig{StateDir: dir, Interval: time.Minute,
		RunProbe: func(context.Context, selftest.Config) (selftest.Result, error) {
			return selftest.Result{Verdict: selftest.Bypassed, Status: "HTTP/1.1 404 Not Found"}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	var opened atomic.Bool
	check := GuardCheck(m, &opened)
	if o := m.Step(context.Background()); o.State != selftest.StateBypassed {
		t.Fatalf("outcome %+v", o)
	}
	if err := check.Probe(context.Background()); err == nil || !strings.Contains(err.Error(), "went around the host guard") {
		t.Errorf("bypassed before the gate opened: %v; want it failing", err)
	}
	opened.Store(true)
	if err := check.Probe(context.Background()); err != nil {
		t.Errorf("bypassed after the gate opened: %v; want it passing (report only)", err)
	}
}
