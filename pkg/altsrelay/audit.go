package altsrelay

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Audit lines of refused connections: at most auditRate per second per source after a
// burst of auditBurst, as the proxy's own audit lines; the rest are counted
// (metaconceal_proxy_alts_audit_lines_dropped_total) and summarised.
const (
	auditRate  = 5
	auditBurst = 20
	// maxAuditSources bounds the table; sources beyond it share one budget.
	maxAuditSources = 1 << 14
	// auditSweepEvery is how often full, quiet entries are forgotten and drops summarised.
	auditSweepEvery = 10 * time.Second
)

type auditSource struct {
	lim     *rate.Limiter
	dropped int64 // since the last line or summary
	ns, pod string
	src     netip.Addr // the last source seen, for the summary
}

// auditor writes refusal lines within each source's budget.
type auditor struct {
	log     *slog.Logger
	dropped func() // counts one dropped line

	mu        sync.Mutex
	bySource  map[string]*auditSource // by the connection's budget key (relayed.key)
	overflow  *auditSource
	lastSweep time.Time
}

func newAuditor(log *slog.Logger, dropped func()) *auditor {
	return &auditor{log: log, dropped: dropped, bySource: map[string]*auditSource{}, lastSweep: time.Now()}
}

// refused writes one audit line for a refused connection from src, or counts it,
// within the budget of key (an attested pod, or all unattributed sources together:
// forged addresses do not multiply the lines).
func (a *auditor) refused(key string, src netip.Addr, ns, pod string, attrs ...slog.Attr) {
	now := time.Now()
	a.mu.Lock()
	if now.Sub(a.lastSweep) >= auditSweepEvery {
		a.sweepLocked(now)
	}
	s := a.bySource[key]
	if s == nil {
		if len(a.bySource) >= maxAuditSources {
			if a.overflow == nil {
				a.overflow = &auditSource{lim: rate.NewLimiter(auditRate, auditBurst), ns: "overflow"}
			}
			s = a.overflow
		} else {
			s = &auditSource{lim: rate.NewLimiter(auditRate, auditBurst), ns: ns, pod: pod}
			a.bySource[key] = s
		}
	}
	s.src = src
	if !s.lim.AllowN(now, 1) {
		s.dropped++
		a.mu.Unlock()
		a.dropped()
		return
	}
	droppedBefore := s.dropped
	s.dropped = 0
	a.mu.Unlock()
	all := append([]slog.Attr{
		slog.String("pod_namespace", ns),
		slog.String("pod_name", pod),
		slog.String("source_ip", src.String()),
	}, attrs...)
	if droppedBefore > 0 {
		all = append(all, slog.Int64("audit_lines_dropped_before", droppedBefore))
	}
	a.log.LogAttrs(context.Background(), slog.LevelWarn, "ALTS relay: connection refused", all...)
}

// sweepLocked summarises drops not yet reported and forgets sources whose budget is
// full again (forgetting them changes nothing).
func (a *auditor) sweepLocked(now time.Time) {
	a.lastSweep = now
	for key, s := range a.bySource {
		if s.dropped > 0 {
			a.log.LogAttrs(context.Background(), slog.LevelWarn, "ALTS relay: audit lines dropped: this source exceeded its audit rate",
				slog.Int64("dropped", s.dropped), slog.String("pod_namespace", s.ns), slog.String("pod_name", s.pod),
				slog.String("last_source_ip", s.src.String()), slog.Int("audit_rate_per_second", auditRate))
			s.dropped = 0
		}
		if s.lim.TokensAt(now) >= auditBurst {
			delete(a.bySource, key)
		}
	}
}
