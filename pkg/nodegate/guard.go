package nodegate

// The datapath self-test's outcome on the node object (pkg/selftest runs it): the
// condition MetadataConcealmentGuard in the node's status, a Warning Event on the node
// when the guard is found bypassed, and the gauge metaconceal_guard_effective. The
// status is changed with a strategic merge patch of status.conditions (merged by type,
// as kubelet does), which needs nodes/status patch; the Event needs events create.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/metaconceal/metaconceal/pkg/selftest"
)

// GuardCondition is the node condition the self-test sets.
const GuardCondition corev1.NodeConditionType = "MetadataConcealmentGuard"

// EventBypassed is the reason of the Warning Event recorded on the node when the
// condition becomes False.
const EventBypassed = "MetadataConcealmentGuardBypassed"

// ConditionStatus maps a self-test state to the condition's status; its reason is
// the state's name (Effective, Bypassed, NotTested).
func ConditionStatus(s selftest.State) corev1.ConditionStatus {
	switch s {
	case selftest.StateEffective:
		return corev1.ConditionTrue
	case selftest.StateBypassed:
		return corev1.ConditionFalse
	}
	return corev1.ConditionUnknown
}

// SetCondition sets want (its Type, Status, Reason and Message) on node's status when
// it differs from what the node carries, and returns the status it had before (""
// when it had none). LastTransitionTime moves only when the status changes.
func SetCondition(ctx context.Context, client kubernetes.Interface, node string, want corev1.NodeCondition, now time.Time) (corev1.ConditionStatus, error) {
	n, err := client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("nodegate: get node %s: %w", node, err)
	}
	var prev corev1.ConditionStatus
	want.LastHeartbeatTime = metav1.NewTime(now)
	want.LastTransitionTime = metav1.NewTime(now)
	for _, c := range n.Status.Conditions {
		if c.Type != want.Type {
			continue
		}
		prev = c.Status
		if c.Status == want.Status && c.Reason == want.Reason && c.Message == want.Message {
			return prev, nil
		}
		if c.Status == want.Status {
			want.LastTransitionTime = c.LastTransitionTime
		}
	}
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{want}}})
	if err != nil {
		return prev, err
	}
	if _, err := client.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: "metaconceal-node-agent"}, "status"); err != nil {
		if apierrors.IsForbidden(err) {
			return prev, fmt.Errorf("nodegate: set condition %s on node %s: %w (the service account needs nodes/status patch; see conf/deploy/rbac.yaml)", want.Type, node, err)
		}
		return prev, fmt.Errorf("nodegate: set condition %s on node %s: %w", want.Type, node, err)
	}
	return prev, nil
}

// NodeEvent records an Event on node (in the default namespace, as kubelet's node
// Events are).
func NodeEvent(ctx context.Context, client kubernetes.Interface, node, eventType, reason, message, component string, now time.Time) error {
	ts := metav1.NewTime(now)
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s.%x", node, now.UnixNano()), Namespace: metav1.NamespaceDefault},
		// kubelet names its node as Events' UID too.
		InvolvedObject: corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: node, UID: types.UID(node)},
		Reason:         reason, Message: message, Type: eventType,
		Source:         corev1.EventSource{Component: component, Host: node},
		FirstTimestamp: ts, LastTimestamp: ts, Count: 1,
	}
	if _, err := client.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("nodegate: Event %s on node %s: %w", reason, node, err)
	}
	return nil
}

// GuardReporter puts self-test outcomes on the node (condition, Event) and in a gauge.
type GuardReporter struct {
	// Client and Node: without them only the gauge and the log report.
	Client kubernetes.Interface
	Node   string
	// Effective is metaconceal_guard_effective (NewGuardGauge); may be nil.
	Effective *prometheus.GaugeVec
	Log       *slog.Logger
	now       func() time.Time
}

// NewGuardGauge registers metaconceal_guard_effective on reg.
func NewGuardGauge(reg prometheus.Registerer) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "metaconceal_guard_effective",
		Help: "1 when the last datapath self-test's raw-socket request from pod reached the proxy (or was dropped), 0 when it reached the metadata server around the host guard; no series while untested.",
	}, []string{"pod"})
	reg.MustRegister(g)
	return g
}

// Report is selftest.MonitorConfig.Report. API errors are logged; the next round
// retries (the condition is compared with the node's, not with the last report).
func (r *GuardReporter) Report(ctx context.Context, o selftest.Outcome) {
	log := r.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if r.Effective != nil {
		r.Effective.Reset()
		switch o.State {
		case selftest.StateEffective:
			r.Effective.WithLabelValues(o.Pod).Set(1)
		case selftest.StateBypassed:
			r.Effective.WithLabelValues(o.Pod).Set(0)
		}
	}
	if r.Client == nil || r.Node == "" {
		return
	}
	now := time.Now
	if r.now != nil {
		now = r.now
	}
	want := corev1.NodeCondition{Type: GuardCondition, Status: ConditionStatus(o.State), Reason: string(o.State), Message: truncate(o.Message(), 1024)}
	prev, err := SetCondition(ctx, r.Client, r.Node, want, now())
	if err != nil {
		log.Error("cannot set the guard condition on the node", "err", err)
		return
	}
	if want.Status == corev1.ConditionFalse && prev != corev1.ConditionFalse {
		if err := NodeEvent(ctx, r.Client, r.Node, corev1.EventTypeWarning, EventBypassed, want.Message, "metaconceal-node-agent", now()); err != nil {
			log.Error("cannot record the guard's Event on the node", "err", err)
		}
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n-3], "") + "..."
}

// GuardCheck is the gate check of the self-test: it fails until the monitor's first
// round ended, and while the last round found the guard bypassed, but only until the
// gate first opened (opened, which the caller sets from Config.OnChange): from then on
// a bypass reports (condition, Event, gauge) and never taints the node.
func GuardCheck(m *selftest.Monitor, opened *atomic.Bool) Check {
	return Check{Name: "guard-selftest", Probe: func(context.Context) error {
		if opened.Load() {
			return nil
		}
		o, ok := m.Last()
		switch {
		case !ok:
			return errors.New("the datapath self-test has not run yet")
		case o.State == selftest.StateBypassed:
			return errors.New("datapath self-test: " + o.Message())
		}
		return nil
	}}
}
