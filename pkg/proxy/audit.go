package proxy

import (
	"context"
	"log/slog"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// BlockNotifier hears of every concealed or denied request, after its audit line, with
// the pod behind it; only for connections the kernel attested (identity.go). It must not block:
// *podevents.Recorder queues a rate-limited Event on the pod.
type BlockNotifier interface {
	Blocked(pod podindex.Pod, d policy.Decision)
}

// Audit lines are bounded: each field taken from the request is clipped, so a line
// stays under 2 KiB whatever the request (JSON escaping at most sextuples a byte).
const maxAuditField = 256

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// auditor is the one audit point: every concealed or denied request, and every
// request served in full to an exposed pod, is logged here within the pod's audit
// rate (lines over it are counted, metaconceal_proxy_audit_lines_dropped_total, and
// summarised), counted by namespace and, when blocked, told to the notifier.
type auditor struct {
	clients *clients
	metrics *Metrics
	log     *slog.Logger
	notify  BlockNotifier // nil: no Events
}

// blocked audits a concealed or denied request (x.d).
func (a *auditor) blocked(x *exchange) {
	ok, dropped := a.clients.allowAudit(x.cl, time.Now())
	if !ok {
		a.metrics.blockedByNS.WithLabelValues(x.cl.ns, x.d.Verdict.String()).Inc()
	} else {
		a.logDropped(x.src, dropped)
		a.metrics.blockedByNS.WithLabelValues(nsLabel(x.src), x.d.Verdict.String()).Inc()
		a.log.LogAttrs(context.Background(), slog.LevelWarn, "metadata request blocked",
			slog.String("verdict", x.d.Verdict.String()),
			slog.String("rule", x.d.Rule.String()),
			slog.String("pod_namespace", x.src.pod.Namespace),
			slog.String("pod_name", x.src.pod.Name),
			slog.String("source_ip", x.src.ip),
			slog.Bool("attested", x.src.attested),
			slog.String("method", clip(x.r.Method, 16)),
			slog.String("path", clip(x.d.Path, maxAuditField)),
			slog.String("target", clip(x.r.RequestURI, maxAuditField)),
		)
	}
	if a.notify != nil && x.src.attested { // Events only on pods the kernel vouched for
		a.notify.Blocked(x.src.pod, x.d)
	}
}

// exposedServed logs a request the policy restricts that an exposed pod is served in
// full (x.d is the exposed decision).
func (a *auditor) exposedServed(x *exchange) {
	ok, dropped := a.clients.allowAudit(x.cl, time.Now())
	if !ok {
		return
	}
	a.logDropped(x.src, dropped)
	a.log.LogAttrs(context.Background(), slog.LevelInfo, "metadata request served to an exposed pod",
		slog.String("rule", x.d.Rule.String()),
		slog.String("pod_namespace", x.src.pod.Namespace),
		slog.String("pod_name", x.src.pod.Name),
		slog.String("source_ip", x.src.ip),
		slog.String("path", clip(x.d.Path, maxAuditField)))
}

// logDropped summarises audit lines dropped before this one.
func (a *auditor) logDropped(src source, dropped int64) {
	if dropped == 0 {
		return
	}
	a.log.LogAttrs(context.Background(), slog.LevelWarn, "audit lines dropped: this pod exceeded its audit rate",
		slog.Int64("dropped", dropped),
		slog.String("pod_namespace", src.pod.Namespace),
		slog.String("pod_name", src.pod.Name),
		slog.String("source_ip", src.ip),
		slog.Int("audit_rate_per_second", auditRate))
}
