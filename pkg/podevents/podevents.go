// Package podevents turns what metaconceal does to a pod into Kubernetes Events on that
// pod: a concealed or denied metadata request (the proxy), a pod found running without
// its rules, repaired or not (the node agent's repair).
//
// Events go through client-go's core/v1 event broadcaster and its correlator: events
// about one pod share a token bucket (Burst events at once, refilled at QPS per second;
// client-go's spam filter keys on source, host and involved object, so the bucket is per
// pod), similar events are aggregated into one whose count grows, and an Event that
// cannot be queued (1,000 waiting) is dropped rather than block the caller. A pod that
// loops on kube-env therefore costs the API server a few requests, not one per attempt.
package podevents

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"unicode"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Reasons of the Events this project makes. They are API: alerts and `kubectl get
// events --field-selector reason=...` name them.
const (
	// ReasonConcealed: the pod asked for a concealed endpoint (kube-env, identity).
	ReasonConcealed = "MetadataConcealed"
	// ReasonDenied: the pod sent a request the policy refuses (legacy API, recursive, ...).
	ReasonDenied = "MetadataDenied"
	// ReasonUnprotected: the pod runs without its metadata rules and was not repaired
	// (repair=report, or the repair failed).
	ReasonUnprotected = "MetadataUnprotected"
	// ReasonRepaired: the node agent installed the pod's rules after the fact.
	ReasonRepaired = "MetadataRepaired"
)

// Defaults of the per-pod rate limit: client-go's own (25 at once, then one per 5 min).
const (
	DefaultBurst = 25
	DefaultQPS   = 1.0 / 300
)

// maxPathInMessage bounds the request path quoted in a message: it is the pod's input.
const maxPathInMessage = 256

// Pod names the pod an Event is about.
type Pod struct {
	Namespace, Name, UID string
}

// Config configures a Recorder.
type Config struct {
	Client kubernetes.Interface
	// Component is the Event's source component ("metaconceal-proxy").
	Component string
	// Node is the Event's source host: the node the pod runs on.
	Node string
	// Burst and QPS are the per-pod token bucket; zero takes the defaults.
	Burst int
	QPS   float64
	Log   *slog.Logger
}

// Recorder records Events on pods. It is safe for concurrent use; Close stops it.
type Recorder struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	log         *slog.Logger
}

// New validates cfg and starts recording to the API server.
func New(cfg Config) (*Recorder, error) {
	if cfg.Client == nil {
		return nil, errors.New("podevents: no API client")
	}
	if cfg.Component == "" {
		return nil, errors.New("podevents: no source component")
	}
	if cfg.Burst < 0 || cfg.QPS < 0 {
		return nil, fmt.Errorf("podevents: burst %d and qps %g must not be negative", cfg.Burst, cfg.QPS)
	}
	if cfg.Burst == 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.QPS == 0 {
		cfg.QPS = DefaultQPS
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := record.NewBroadcaster(record.WithCorrelatorOptions(record.CorrelatorOptions{
		BurstSize: cfg.Burst,
		QPS:       float32(cfg.QPS),
	}))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cfg.Client.CoreV1().Events("")})
	return &Recorder{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: cfg.Component, Host: cfg.Node}),
		log:         log,
	}, nil
}

// Close stops recording; Events still queued are dropped.
func (r *Recorder) Close() { r.broadcaster.Shutdown() }

// Emit queues one Event on pod. A pod without namespace or name (a source IP with no
// state record) cannot be named and gets none.
func (r *Recorder) Emit(pod Pod, eventType, reason, message string) {
	if pod.Namespace == "" || pod.Name == "" {
		return
	}
	r.recorder.Event(Reference(pod), eventType, reason, message)
}

// Blocked records a concealed or denied request of the pod behind a source IP; it is
// the proxy's notifier (proxy.Config.Notify). An allowed decision records nothing.
func (r *Recorder) Blocked(pod podindex.Pod, d policy.Decision) {
	reason, message, ok := BlockedEvent(d)
	if !ok {
		return
	}
	r.Emit(Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}, corev1.EventTypeWarning, reason, message)
}

// BlockedEvent is the reason and message of the Event for a policy decision; ok is
// false for an allowed request.
func BlockedEvent(d policy.Decision) (reason, message string, ok bool) {
	path := quotePath(d.Path)
	switch d.Verdict {
	case policy.Conceal:
		return ReasonConcealed, fmt.Sprintf("metadata request for %s concealed (rule %s)", path, d.Rule), true
	case policy.Deny:
		return ReasonDenied, fmt.Sprintf("metadata request for %s denied (rule %s: %s)", path, d.Rule, d.Rule.Description()), true
	}
	return "", "", false
}

// quotePath renders the pod-supplied path for a message: Go-quoted (no control
// characters or newlines reach the API) and cut to maxPathInMessage characters.
func quotePath(p string) string {
	if p == "" {
		return `""`
	}
	cut := false
	if len(p) > maxPathInMessage {
		p, cut = p[:maxPathInMessage], true
		p = strings.ToValidUTF8(p, string(unicode.ReplacementChar))
	}
	q := fmt.Sprintf("%q", p)
	if cut {
		q += "..."
	}
	return q
}

// Reference is the ObjectReference of pod as Events name it.
func Reference(pod Pod) *corev1.ObjectReference {
	return &corev1.ObjectReference{
		Kind:       "Pod",
		APIVersion: "v1",
		Namespace:  pod.Namespace,
		Name:       pod.Name,
		UID:        types.UID(pod.UID),
	}
}
