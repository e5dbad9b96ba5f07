package hostguard

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// The check against one iptables-save: a whole guard needs nothing; each kind of damage
// is named and put back by a block that touches only the guard's rules (foreign rules
// never appear in it), with the guard's jumps reinserted in their order.
func TestCheck(t *testing.T) {
	t.Parallel()
	cfg, err := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, ConnRate: 100, ConnBurst: 200}.normalized()
	if err != nil {
		t.Fatal(err)
	}
	f := families(cfg)[0]
	spoof := []hookSpec{hook(xtables.TableFilter, "INPUT", spoofJump(netip.MustParseAddr("169.254.169.252")))}
	chains := append(f.chains(), chainSpec{table: xtables.TableFilter, name: SpoofChain, rules: []string{`-A METACONCEAL-SPOOF -s 10.0.0.2/32 -j DROP`}})
	hooks := f.hooks(spoof)
	ours := map[string][]string{}
	for table, cs := range tableChains {
		ours[table] = slices.Clone(cs)
	}
	ours[xtables.TableFilter] = append(ours[xtables.TableFilter], SpoofChain)

	// A whole guard, rendered as iptables-save prints it, with foreign rules around.
	const foreign = "-A PREROUTING -s 10.9.9.9/32 -j ACCEPT"
	save := func(drop func(string) bool) string {
		var b strings.Builder
		for _, table := range tableOrder {
			b.WriteString("*" + table + "\n")
			for _, bi := range builtins[table] {
				b.WriteString(":" + bi + " ACCEPT [0:0]\n")
			}
			for _, c := range chains {
				if c.table == table {
					b.WriteString(":" + c.name + " - [0:0]\n")
				}
			}
			if table == xtables.TableNAT {
				b.WriteString(foreign + "\n")
			}
			for _, h := range hooks {
				if h.table == table && !drop(h.line()) {
					b.WriteString(h.line() + "\n")
				}
			}
			for _, c := range chains {
				if c.table == table {
					for _, r := range c.rules {
						if !drop(r) {
							b.WriteString(r + "\n")
						}
					}
				}
			}
			b.WriteString("COMMIT\n")
		}
		return b.String()
	}
	keep := func(string) bool { return false }
	// The guard's INPUT jump above the anti-spoofing and limit jumps.
	outOfOrder := strings.Replace(save(keep), inputJump.line()+"\n", "", 1)
	outOfOrder = strings.Replace(outOfOrder, spoof[0].line()+"\n", inputJump.line()+"\n"+spoof[0].line()+"\n", 1)
	for _, tc := range []struct {
		name        string
		save        string
		wantMissing []string
		wantBlock   map[string][]string // table -> substrings of its block
	}{
		{"whole", save(keep), nil, nil},
		{"nat jump deleted", save(func(l string) bool { return l == natJump.line() }),
			[]string{"nat PREROUTING jump to " + Chain},
			map[string][]string{xtables.TableNAT: {"-I PREROUTING 1 " + natJump.spec + "\n"}}},
		{"spoof chain flushed", save(func(l string) bool { return strings.HasPrefix(l, "-A "+SpoofChain+" ") }),
			[]string{"filter chain " + SpoofChain + " rules"},
			map[string][]string{xtables.TableFilter: {":" + SpoofChain + " - [0:0]\n-F " + SpoofChain + "\n-A METACONCEAL-SPOOF -s 10.0.0.2/32 -j DROP\n"}}},
		{"limit chain gone", strings.Replace(save(func(l string) bool { return strings.Contains(l, ChainLimit) }), ":"+ChainLimit+" - [0:0]\n", "", 1),
			[]string{"filter chain " + ChainLimit, "filter INPUT jump to " + ChainLimit},
			map[string][]string{xtables.TableFilter: {
				":" + ChainLimit + " - [0:0]\n",
				// INPUT's guard jumps, present ones deleted, all inserted in order.
				"-D INPUT " + spoof[0].spec + "\n-D INPUT " + inputJump.spec + "\n",
				"-I INPUT 1 " + inputJump.spec + "\n-I INPUT 1 " + limitJump.spec + "\n-I INPUT 1 " + spoof[0].spec + "\n",
			}}},
		{"raw jump deleted", save(func(l string) bool { return l == sourceJump.line() }),
			[]string{"raw PREROUTING jump to " + ChainSource},
			map[string][]string{xtables.TableRaw: {"-I PREROUTING 1 " + sourceJump.spec + "\n"}}},
		{"out of order", outOfOrder,
			[]string{"filter INPUT guard jumps out of order or duplicated"},
			map[string][]string{xtables.TableFilter: {"-D INPUT " + inputJump.spec + "\n", "-I INPUT 1 " + spoof[0].spec + "\n"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := xtables.ParseSave(tc.save)
			if err != nil {
				t.Fatal(err)
			}
			missing, blocks := check(snap, chains, hooks, ours, true)
			if !slices.Equal(missing, tc.wantMissing) {
				t.Errorf("missing %q, want %q", missing, tc.wantMissing)
			}
			if len(blocks) != len(tc.wantBlock) {
				t.Errorf("blocks for %d tables, want %d: %q", len(blocks), len(tc.wantBlock), blocks)
			}
			for table, subs := range tc.wantBlock {
				for _, sub := range subs {
					if !strings.Contains(blocks[table], sub) {
						t.Errorf("%s block lacks %q:\n%s", table, sub, blocks[table])
					}
				}
			}
			for table, b := range blocks {
				if strings.Contains(b, "10.9.9.9") {
					t.Errorf("%s block touches a foreign rule:\n%s", table, b)
				}
			}
		})
	}
}

// Missing (the readiness gate's check) wants the chains and jumps every config has,
// wherever the jumps stand.
func TestMissing(t *testing.T) {
	t.Parallel()
	var b strings.Builder
	for _, table := range []string{xtables.TableNAT, xtables.TableFilter} {
		b.WriteString("*" + table + "\n")
		for _, c := range tableChains[table] {
			b.WriteString(":" + c + " - [0:0]\n")
		}
		b.WriteString("-A INPUT -s 10.9.9.9/32 -j ACCEPT\n")
		for _, h := range slices.Backward(baseHooks) {
			if h.table == table {
				b.WriteString(h.line() + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	snap, err := xtables.ParseSave(b.String())
	if err != nil {
		t.Fatal(err)
	}
	if m := Missing(snap); len(m) != 0 {
		t.Errorf("installed guard (jumps in another order, behind a foreign rule): missing %q", m)
	}
	snap, err = xtables.ParseSave(strings.Replace(b.String(), outputJump.line()+"\n", "", 1))
	if err != nil {
		t.Fatal(err)
	}
	if m := Missing(snap); !slices.Equal(m, []string{"filter OUTPUT jump to " + ChainFrom}) {
		t.Errorf("missing %q, want the OUTPUT jump", m)
	}
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}
	if _, err := New(cfg, Options{Interval: time.Millisecond}); err == nil {
		t.Error("a 1 ms interval was accepted")
	}
	if _, err := New(Config{}, Options{}); err == nil {
		t.Error("a config without a listen address was accepted")
	}
	g, err := New(cfg, Options{})
	if err != nil || g.interval != DefaultReconcileInterval {
		t.Errorf("New = %v, %v; want the default interval %s", g, err, DefaultReconcileInterval)
	}
}
