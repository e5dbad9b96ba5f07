package hostguard

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Generations: during a rolling update two proxies run side by side on a node, and
// each re-asserts the guard every few seconds. When the new release changed the
// guard, the old proxy would put its version back and the new one would undo it, each
// pass. So the guard carries the generation of the proxy that last wrote it: a marker
// chain in the IPv4 filter table, GenerationChain, no jump into it, holding one rule
// whose comment is "metaconceal generation=G heartbeat=UNIX". A proxy whose generation
// is lower than the marker's, while the marker's heartbeat is fresh (within
// generationLease), leaves the guard alone: it installs and repairs nothing, logs it
// once and says so in metaconceal_guard_deferred_to_generation. A proxy of the
// marker's generation or a newer one owns the guard: it stamps the marker when it
// installs and refreshes the heartbeat every generationRefresh. A marker left by a
// proxy that is gone (a heartbeat older than the lease: a rollback to an older image by
// hand, a crash) is taken over. The DaemonSet gives each proxy its pod's
// pod-template-generation, which grows with every change of the template (a rollback
// with `kubectl rollout undo` too); 0, the default, is lower than every DaemonSet pod's.

// GenerationChain is the marker chain (IPv4 filter table).
const GenerationChain = "METACONCEAL-GEN"

const (
	generationRefresh = 20 * time.Second
	generationLease   = 3 * generationRefresh
)

var markerRE = regexp.MustCompile(`metaconceal generation=(\d+) heartbeat=(\d+)`)

// marker is the generation stamped on the guard.
type marker struct {
	gen   uint64
	beat  time.Time
	found bool
}

// readMarker reads the marker from one iptables-save of the IPv4 family.
func readMarker(snap xtables.Snapshot) marker {
	for _, r := range snap.ChainRules(xtables.TableFilter, GenerationChain) {
		m := markerRE.FindStringSubmatch(r)
		if m == nil {
			continue
		}
		gen, err1 := strconv.ParseUint(m[1], 10, 64)
		beat, err2 := strconv.ParseInt(m[2], 10, 64)
		if err1 == nil && err2 == nil {
			return marker{gen: gen, beat: time.Unix(beat, 0), found: true}
		}
	}
	return marker{}
}

// markerPayload is the iptables-restore input (--noflush) that stamps gen at now.
func markerPayload(gen uint64, now time.Time) string {
	var b strings.Builder
	b.WriteString("*" + xtables.TableFilter + "\n")
	writeChain(&b, chainSpec{table: xtables.TableFilter, name: GenerationChain, rules: []string{
		xtables.Line("-A", GenerationChain, []string{"-m", "comment", "--comment",
			fmt.Sprintf("metaconceal generation=%d heartbeat=%d", gen, now.Unix()), "-j", "RETURN"}),
	}})
	b.WriteString("COMMIT\n")
	return b.String()
}

// generationState is the Guard's view of the marker (guarded by Guard.mu).
type generationState struct {
	own        uint64
	now        func() time.Time
	lastStamp  time.Time // when this Guard last wrote the marker
	deferredTo uint64    // the newer generation left in charge, 0 when none
	deferred   prometheus.Gauge
}

func newGenerationState(own uint64) *generationState {
	return &generationState{own: own, now: time.Now, deferred: prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "metaconceal_guard_deferred_to_generation",
		Help: "The newer proxy generation this proxy leaves the host guard to (it installs and repairs nothing while that one's heartbeat is fresh); 0 when this proxy owns the guard.",
	})}
}

// markerFamily is the family that carries the marker: IPv4, whose tools every node has.
func (g *Guard) markerFamily() (family, bool) {
	for _, f := range g.fams {
		if !f.v6 {
			return f, true
		}
	}
	return family{}, false
}

// yield reads the marker and reports whether a newer generation, alive, owns the
// guard; snap is the IPv4 family's iptables-save when the caller has it.
func (g *Guard) yield(ctx context.Context, snap *xtables.Snapshot) (bool, error) {
	gs := g.gen
	f, ok := g.markerFamily()
	if !ok {
		return false, nil
	}
	if snap == nil {
		s, err := f.run.Snapshot(ctx, f.fam)
		if err != nil {
			return false, fmt.Errorf("hostguard: reading the generation marker: %w", err)
		}
		snap = &s
	}
	m := readMarker(*snap)
	now := gs.now()
	switch {
	case m.found && m.gen > gs.own && now.Sub(m.beat) < generationLease:
		if gs.deferredTo != m.gen {
			g.log.Warn("host guard written by a newer proxy generation: leaving it to that one (no install, no repair)",
				"own_generation", gs.own, "guard_generation", m.gen, "heartbeat_age", now.Sub(m.beat).Round(time.Second).String())
		}
		gs.deferredTo = m.gen
		gs.deferred.Set(float64(m.gen))
		return true, nil
	case m.found && m.gen > gs.own:
		g.log.Warn("host guard's newer generation stopped its heartbeat: taking the guard over",
			"own_generation", gs.own, "guard_generation", m.gen, "heartbeat_age", now.Sub(m.beat).Round(time.Second).String())
	}
	if gs.deferredTo != 0 {
		g.log.Info("host guard: this proxy's generation owns the guard again", "own_generation", gs.own)
		gs.deferredTo = 0
		gs.deferred.Set(0)
	}
	return false, nil
}

// stamp writes this generation's marker when it is not there or its heartbeat is due
// (force: at install).
func (g *Guard) stamp(ctx context.Context, snap *xtables.Snapshot, force bool) error {
	gs := g.gen
	f, ok := g.markerFamily()
	if !ok {
		return nil
	}
	now := gs.now()
	if !force && snap != nil {
		if m := readMarker(*snap); m.found && m.gen == gs.own && now.Sub(gs.lastStamp) < generationRefresh && now.Sub(m.beat) < generationRefresh {
			return nil
		}
	}
	if err := f.restore(ctx, markerPayload(gs.own, now)); err != nil {
		return fmt.Errorf("stamping generation %d: %w", gs.own, err)
	}
	gs.lastStamp = now
	return nil
}

// removeGeneration deletes the marker chain (uninstall); a missing one is not an error.
func removeGeneration(ctx context.Context, cfg Config) error {
	for _, f := range families(cfg) {
		if f.v6 {
			continue
		}
		snap, err := f.run.Snapshot(ctx, f.fam)
		if err != nil {
			return fmt.Errorf("hostguard: %w", err)
		}
		if !snap.HasChain(xtables.TableFilter, GenerationChain) {
			return nil
		}
		return f.restore(ctx, "*filter\n-F "+GenerationChain+"\n-X "+GenerationChain+"\nCOMMIT\n")
	}
	return nil
}
