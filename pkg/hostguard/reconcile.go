package hostguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// DefaultReconcileInterval is how often a Guard checks itself (metaconceal-proxy's
// --guard-reconcile-interval): 4 s, so that a part removed just after a pass is back
// within 5 s (the wait for the next pass, then one pass of tens of milliseconds).
const DefaultReconcileInterval = 4 * time.Second

// minReconcileInterval keeps a mistyped interval from turning the check into a busy
// loop of iptables-save processes.
const minReconcileInterval = 100 * time.Millisecond

// passTimeout bounds one reconciliation pass (an xtables lock held by someone else
// makes iptables-restore wait).
const passTimeout = 30 * time.Second

// Options configure a Guard.
type Options struct {
	// Interval is how often Run checks the guard; 0 is DefaultReconcileInterval.
	Interval time.Duration
	// Log receives what was installed, found missing and repaired; nil discards.
	Log *slog.Logger
	// Registerer, when set, gets the Guard's metrics (metaconceal_guard_repairs_total,
	// metaconceal_guard_reconcile_failures_total).
	Registerer prometheus.Registerer
	// NetnsPath, when set, is the network namespace the Guard works in (tests set it
	// to a simulated node). Empty means the one of the thread that calls New (the
	// proxy runs wholly in the node's): every later call checks that it runs there,
	// and changes nothing otherwise.
	NetnsPath string
	// Generation is this proxy's generation (generation.go): the guard is left alone
	// while a proxy of a newer one keeps it.
	Generation uint64
}

// Guard is the host guard as desired state, with one lifecycle: Install puts it in
// place (chains, jumps, listen addresses on lo, and the anti-spoofing chain of
// Spoof), Run re-asserts all of it every Interval, and Spoof's Attest changes the
// anti-spoofing part of it. It is safe for concurrent use.
//
// One pass (Reconcile) costs one iptables-save per family when the guard is whole. When
// something is missing (a chain, a rule of a guard chain, a jump, a jump out of its
// order among the guard's jumps, a listen address on lo) it logs what and puts it back
// with one iptables-restore --noflush per family: the guard chains that differ are
// rewritten, and in a built-in chain whose guard jumps differ those jumps (and only
// those) are deleted and inserted again at the top. Rules that are not the guard's are
// never removed, and keep their order.
type Guard struct {
	cfg      Config
	fams     []family
	spoof    *SpoofGuard
	interval time.Duration
	log      *slog.Logger
	netns    string

	repairs  *prometheus.CounterVec
	failures prometheus.Counter

	home       netnsID           // with netns empty: the namespace New was called in
	mu         sync.Mutex        // one pass at a time
	lastRepair map[bool][]string // per family (v6): what the previous pass put back
	warnedLoop map[bool]bool     // per family: the repeated-repair error was logged
	gen        *generationState  // the generation marker (generation.go)
}

// New validates cfg and opts and returns the Guard; nothing is changed before Install.
func New(cfg Config, opts Options) (*Guard, error) {
	cfg, err := cfg.normalized()
	if err != nil {
		return nil, err
	}
	if opts.Interval == 0 {
		opts.Interval = DefaultReconcileInterval
	}
	if opts.Interval < minReconcileInterval {
		return nil, fmt.Errorf("hostguard: reconcile interval %s: want at least %s", opts.Interval, minReconcileInterval)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	spoof, err := NewSpoofGuard(cfg, log)
	if err != nil {
		return nil, err
	}
	spoof.NetnsPath = opts.NetnsPath
	var home netnsID
	if opts.NetnsPath == "" {
		runtime.LockOSThread()
		home, err = threadNetns()
		runtime.UnlockOSThread()
		if err != nil {
			return nil, err
		}
		spoof.home = home
	}
	g := &Guard{cfg: cfg, fams: families(cfg), spoof: spoof, interval: opts.Interval, log: log, netns: opts.NetnsPath,
		lastRepair: map[bool][]string{}, warnedLoop: map[bool]bool{}, home: home, gen: newGenerationState(opts.Generation),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metaconceal_guard_repairs_total",
			Help: "Repairs of the host guard by its reconciliation, by family (ipv4, ipv6) and table (raw, nat, filter; lo: a listen address put back on lo).",
		}, []string{"family", "table"}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metaconceal_guard_reconcile_failures_total",
			Help: "Reconciliation passes of the host guard that failed (the error is logged).",
		}),
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{g.repairs, g.failures, g.gen.deferred} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("hostguard: registering metrics: %w", err)
			}
		}
	}
	return g, nil
}

// Spoof is the attestation part of the guard, the podindex.Attestor.
func (g *Guard) Spoof() *SpoofGuard { return g.spoof }

// in runs fn in the Guard's network namespace.
func (g *Guard) in(fn func() error) error {
	if g.netns == "" {
		return inHome(g.home, fn)
	}
	var err error
	if nsErr := ns.WithNetNSPath(g.netns, func(ns.NetNS) error { err = fn(); return nil }); nsErr != nil {
		return fmt.Errorf("hostguard: entering %s: %w", g.netns, nsErr)
	}
	return err
}

// Install puts the whole guard in place (see the package doc and Install), and the
// attestation chains with the records Attest was last given (none yet: an empty
// AttestChain, so every connection is unattributed until Attest says otherwise).
func (g *Guard) Install(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.in(func() error {
		// The IPv4 save carries the generation marker and serves the check below.
		var v4 *xtables.Snapshot
		if f, ok := g.markerFamily(); ok {
			snap, err := f.run.Snapshot(ctx, f.fam)
			if err != nil {
				return fmt.Errorf("hostguard: %w", err)
			}
			v4 = &snap
		}
		if yield, err := g.yield(ctx, v4); err != nil || yield {
			return err // a newer generation keeps the guard
		}
		// A guard already whole (the previous generation's, same config) is kept as
		// it is: a rolling update need not rewrite the node's rules (on the cluster
		// e2e, pods' new connections waited 50-225 ms around the surge proxy's
		// rewrite in four of six updates; docs/figures.md).
		whole, err := g.whole(ctx, v4)
		if err != nil {
			return err
		}
		if whole {
			if _, err := addListenAddrs(g.cfg, g.log); err != nil {
				return err
			}
			g.log.Info("host guard already in place and whole: kept as it is")
		} else if err := Install(ctx, g.cfg, g.log); err != nil {
			return err
		}
		if err := g.stamp(ctx, nil, true); err != nil {
			return err
		}
		g.spoof.mu.Lock()
		defer g.spoof.mu.Unlock()
		clear(g.spoof.last) // rewrite whatever an earlier run left
		return g.spoof.attest(ctx, g.spoof.records)
	})
}

// whole reports whether every family's guard is in place exactly as this config
// wants it, attestation chains aside (Install rewrites them from the records) except
// that they exist; v4 is the IPv4 family's save when the caller has it.
func (g *Guard) whole(ctx context.Context, v4 *xtables.Snapshot) (bool, error) {
	for _, f := range g.fams {
		if len(f.metadata) == 0 {
			continue
		}
		var snap xtables.Snapshot
		if !f.v6 && v4 != nil {
			snap = *v4
		} else {
			var err error
			if snap, err = f.run.Snapshot(ctx, f.fam); err != nil {
				return false, fmt.Errorf("hostguard: %w", err)
			}
		}
		chains, hooks, ours := g.desired(f, nil)
		missing, _ := check(snap, chains, hooks, ours, true)
		for _, sf := range g.spoof.fams {
			if sf.v6 == f.v6 && !snap.HasChain(xtables.TableNAT, AttestChain) {
				missing = append(missing, "nat chain "+AttestChain)
			}
		}
		if len(missing) > 0 {
			g.log.Info("host guard not whole: installing it", "iptables", f.names.Iptables, "missing", missing)
			return false, nil
		}
	}
	return true, nil
}

// Repair is what one pass found missing and put back.
type Repair struct {
	// Missing names each missing part, e.g. "IPv4 filter INPUT jump to METACONCEAL-GUARD".
	Missing []string
	// Restores is how many iptables-restore processes the pass ran (0 when whole).
	Restores int
}

// Reconcile runs one pass: it checks the guard against the desired state and puts back
// what is missing (see Guard).
func (g *Guard) Reconcile(ctx context.Context) (Repair, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var rep Repair
	err := g.in(func() error {
		var err error
		rep, err = g.reconcile(ctx)
		return err
	})
	return rep, err
}

func familyLabel(f xtables.Family) string {
	if f == xtables.IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

func (g *Guard) reconcile(ctx context.Context) (Repair, error) {
	var rep Repair
	// Attest changes the attestation part: not while a pass reads and writes it. The
	// lock is taken before the first save, which the pass compares with what Attest
	// last wrote: a save taken before an Attest that lands meanwhile would show its
	// rules as missing, and count a repair that is none.
	g.spoof.mu.Lock()
	defer g.spoof.mu.Unlock()
	// The IPv4 save first: it carries the generation marker, and serves the pass.
	var v4 *xtables.Snapshot
	if f, ok := g.markerFamily(); ok {
		snap, err := f.run.Snapshot(ctx, f.fam)
		if err != nil {
			return rep, fmt.Errorf("hostguard: %w", err)
		}
		v4 = &snap
	}
	if yield, err := g.yield(ctx, v4); err != nil || yield {
		return rep, err // a newer generation keeps the guard: nothing is repaired
	}
	// Addresses first: the DNAT target must be local before traffic is sent to it.
	added, err := addListenAddrs(g.cfg, g.log)
	for _, a := range added {
		rep.Missing = append(rep.Missing, "listen address "+a.String()+" on lo")
		g.repairs.WithLabelValues(familyLabel(xtables.FamilyOf(a)), "lo").Inc()
	}
	if len(added) > 0 {
		g.log.Warn("host guard repaired: listen addresses put back on lo", "addrs", added)
	}
	errs := []error{err}
	for _, f := range g.fams {
		var sf *spoofFamily
		for i := range g.spoof.fams {
			if g.spoof.fams[i].v6 == f.v6 {
				sf = &g.spoof.fams[i]
			}
		}
		if len(f.metadata) == 0 && sf == nil {
			continue
		}
		var snap xtables.Snapshot
		if !f.v6 && v4 != nil {
			snap = *v4
		} else if snap, err = f.run.Snapshot(ctx, f.fam); err != nil {
			errs = append(errs, fmt.Errorf("hostguard: %w", err))
			continue
		}
		chains, hooks, ours := g.desired(f, sf)
		missing, blocks := check(snap, chains, hooks, ours, true)
		last := g.lastRepair[f.v6]
		g.lastRepair[f.v6] = missing
		if len(missing) == 0 {
			continue
		}
		if slices.Equal(missing, last) && !g.warnedLoop[f.v6] {
			// The same parts missing right after they were put back: something
			// removes them at once, or this iptables prints them differently from
			// how the guard writes them. Said once; the repairs go on.
			g.warnedLoop[f.v6] = true
			g.log.Error("host guard: the same parts are missing again right after being put back (removed at once by someone else, or printed differently by this iptables version)",
				"iptables", f.names.Iptables, "missing", missing)
		}
		var payload strings.Builder
		var tables []string
		for _, table := range tableOrder {
			if b, ok := blocks[table]; ok {
				payload.WriteString("*" + table + "\n" + b + "COMMIT\n")
				tables = append(tables, table)
			}
		}
		rep.Restores++
		if err := f.restore(ctx, payload.String()); err != nil {
			errs = append(errs, fmt.Errorf("putting back %s: %w", strings.Join(missing, ", "), err))
			continue
		}
		for _, t := range tables {
			g.repairs.WithLabelValues(familyLabel(f.fam), t).Inc()
		}
		for _, m := range missing {
			rep.Missing = append(rep.Missing, f.fam.String()+" "+m)
		}
		g.log.Warn("host guard repaired: missing parts put back", "iptables", f.names.Iptables, "tables", tables, "missing", missing)
	}
	if err := g.stamp(ctx, v4, false); err != nil { // the marker's heartbeat, when due
		errs = append(errs, err)
	}
	return rep, errors.Join(errs...)
}

// desired returns the family's guard chains and jumps as they should be, and which
// chains' jumps are the guard's, per table.
func (g *Guard) desired(f family, sf *spoofFamily) ([]chainSpec, []hookSpec, map[string][]string) {
	var chains []chainSpec
	var spoofHooks []hookSpec
	ours := map[string][]string{}
	if sf != nil {
		rules, known := g.spoof.last[f.v6]
		chains = append(chains, sf.chains(rules, known)...)
		spoofHooks = sf.hooks()
		for table, cs := range spoofChains {
			ours[table] = slices.Clone(cs)
		}
	}
	if len(f.metadata) == 0 {
		return chains, spoofHooks, ours
	}
	for table, cs := range tableChains {
		ours[table] = append(ours[table], cs...)
	}
	return append(f.chains(), chains...), f.hooks(spoofHooks), ours
}

// Run re-asserts the guard every interval until ctx is done. A pass that fails is
// logged and counted; the next one tries again.
func (g *Guard) Run(ctx context.Context) {
	t := time.NewTicker(g.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, passTimeout)
		_, err := g.Reconcile(pctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			g.failures.Inc()
			g.log.Error("host guard reconciliation failed", "err", err)
		}
	}
}

// Start runs Run in the background and returns the function that stops it and waits
// until it has stopped.
func (g *Guard) Start(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.Run(ctx)
	}()
	g.log.Info("host guard reconciliation started", "interval", g.interval.String())
	return func() {
		cancel()
		<-done
	}
}
