package hostguard

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/pkg/gce"
)

// unmarkedLines are the node's guard lines without the generation marker (whose
// heartbeat changes).
func unmarkedLines(t *testing.T, node *simnode.Node, save string) []string {
	t.Helper()
	return slices.DeleteFunc(metaconcealLines(t, node, save), func(l string) bool { return strings.Contains(l, GenerationChain) })
}

// Two proxy generations side by side (a rolling update) whose guards differ (here the
// SYN limit's rate): the older one leaves the newer one's guard alone, pass after pass,
// and says so in its gauge; once the newer one's heartbeat is stale (it is gone), the
// older one takes the guard over; a newer one running again takes it back.
func TestGenerationsDoNotFight(t *testing.T) {
	inEachBackend(t, func(t *testing.T, ctx context.Context, b backendCase, node *simnode.Node) {
		cfg := func(rate uint32) Config {
			return Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ConnRate: rate, ConnBurst: DefaultConnBurst, Backend: b.backend}
		}
		regOld := prometheus.NewRegistry()
		older, err := New(cfg(DefaultConnRate), Options{Log: testLogger(t), Registerer: regOld, NetnsPath: node.Path, Generation: 1})
		if err != nil {
			t.Fatal(err)
		}
		newer, err := New(cfg(DefaultConnRate*2), Options{Log: testLogger(t), NetnsPath: node.Path, Generation: 2})
		if err != nil {
			t.Fatal(err)
		}
		if err := older.Install(ctx); err != nil {
			t.Fatal(err)
		}
		olderLines := unmarkedLines(t, node, b.save)
		if err := newer.Install(ctx); err != nil {
			t.Fatal(err)
		}
		newerLines := unmarkedLines(t, node, b.save)
		if slices.Equal(olderLines, newerLines) {
			t.Fatalf("the two configs give the same guard:\n%s", strings.Join(newerLines, "\n"))
		}
		for i := range 3 {
			for _, g := range []*Guard{older, newer} {
				if rep, err := g.Reconcile(ctx); err != nil || rep.Restores != 0 {
					t.Fatalf("pass %d of generation %d: %+v, %v; want nothing written", i, g.gen.own, rep, err)
				}
			}
		}
		if got := unmarkedLines(t, node, b.save); !slices.Equal(got, newerLines) {
			t.Errorf("after both reconciled, the guard is not the newer generation's:\n%s", strings.Join(got, "\n"))
		}
		if v := testutil.ToFloat64(older.gen.deferred); v != 2 {
			t.Errorf("older's metaconceal_guard_deferred_to_generation = %v, want 2", v)
		}
		// The newer one is gone: its heartbeat goes stale and the older one takes over.
		older.gen.now = func() time.Time { return time.Now().Add(2 * generationLease) }
		if rep, err := older.Reconcile(ctx); err != nil || rep.Restores == 0 {
			t.Errorf("older's pass after the lease: %+v, %v; want its guard written back", rep, err)
		}
		if got := unmarkedLines(t, node, b.save); !slices.Equal(got, olderLines) {
			t.Errorf("after the takeover, the guard is not the older generation's:\n%s", strings.Join(got, "\n"))
		}
		if v := testutil.ToFloat64(older.gen.deferred); v != 0 {
			t.Errorf("older's gauge after the takeover = %v, want 0", v)
		}
		if rep, err := newer.Reconcile(ctx); err != nil || rep.Restores == 0 {
			t.Errorf("newer's pass after the takeover: %+v, %v; want its guard written back", rep, err)
		}
		if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg(DefaultConnRate), nil) }); err != nil {
			t.Fatal(err)
		}
		if left := metaconcealLines(t, node, b.save); len(left) > 0 {
			t.Errorf("after Remove:\n%s", strings.Join(left, "\n"))
		}
	})
}

// The next generation's Install keeps a guard that is already whole with its config
// (a rolling update of the same settings): no rewrite of the guard's tables, which
// the node's datapath pays for; a guard missing a part is installed whole again.
func TestInstallKeepsWholeGuard(t *testing.T) {
	inEachBackend(t, func(t *testing.T, ctx context.Context, b backendCase, node *simnode.Node) {
		// As the proxy's defaults: both metadata addresses, an IPv4 listener only
		// (so no IPv6 attestation chain).
		cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
			MetadataAddrs: []netip.Addr{gce.MetadataIPv4, gce.MetadataIPv6},
			ConnRate:      DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: b.backend}
		install := func(gen uint64) string {
			t.Helper()
			var logs strings.Builder
			g, err := New(cfg, Options{Log: slog.New(slog.NewTextHandler(&logs, nil)), NetnsPath: node.Path, Generation: gen})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Install(ctx); err != nil {
				t.Fatalf("generation %d: %v", gen, err)
			}
			return logs.String()
		}
		if logs := install(1); !strings.Contains(logs, "host guard installed") {
			t.Fatalf("first install did not install:\n%s", logs)
		}
		first := unmarkedLines(t, node, b.save)
		logs := install(2)
		if !strings.Contains(logs, "kept as it is") || strings.Contains(logs, "host guard installed") {
			t.Errorf("second install of the same config rewrote the guard:\n%s", logs)
		}
		if got := unmarkedLines(t, node, b.save); !slices.Equal(got, first) {
			t.Errorf("guard after the kept install differs:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(first, "\n"))
		}
		// A part gone: the next generation installs the guard whole again.
		ipt := strings.TrimSuffix(b.save, "-save")
		if _, err := node.Exec(ctx, ipt, "-t", "filter", "-F", ChainFrom); err != nil {
			t.Fatal(err)
		}
		if logs := install(3); !strings.Contains(logs, "host guard installed") {
			t.Errorf("install over a guard missing its %s rules did not install:\n%s", ChainFrom, logs)
		}
		if got := unmarkedLines(t, node, b.save); !slices.Equal(got, first) {
			t.Errorf("guard after the repairing install differs:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(first, "\n"))
		}
	})
}
