package xtables

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// A Runner against real iptables in a fresh netns, every backend and family: Restore
// writes what Rule renders, Snapshot reads it back verbatim (the quoting is the one
// iptables-save prints), the go-iptables handle sees the same programs' rules, a
// failing restore reports the program's message and the input, and every process is
// counted. Wait 0 (as long as it takes, the host guard's) and the default both work.
func TestRunnerInNetns(t *testing.T) {
	for _, b := range Backends {
		for _, f := range Families {
			t.Run(fmt.Sprintf("%s/%s", b, f), func(t *testing.T) {
				names, err := Names(b, f)
				if err != nil {
					t.Fatal(err)
				}
				testutil.RequirePrivileged(t, "ip", names.Restore, names.Save, names.Iptables)
				t.Parallel()
				name := "mc-xtables-" + simnode.RandomSuffix()
				if _, err := simnode.Run(context.Background(), "ip", "netns", "add", name); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := simnode.DeleteNetns(name); err != nil {
						t.Errorf("delete netns %s: %v", name, err)
					}
				})
				const chain = "MC-XTABLES-TEST"
				rule := Rule{"-m", "comment", "--comment", `metaconceal "quoted" c1 eth0`, "-j", "RETURN"}
				jump := Rule{"-m", "comment", "--comment", "a b", "-j", chain}
				input := "*" + TableFilter + "\n:" + chain + " - [0:0]\n" + Line("-A", chain, rule) + "\n" +
					Line("-I", "OUTPUT", append(Rule{"1"}, jump...)) + "\nCOMMIT\n"
				for _, wait := range []int{0, 1} {
					r := NewRunner(b)
					if wait == 0 {
						r.Wait = 0
					}
					err := ns.WithNetNSPath(simnode.NetnsDir+"/"+name, func(ns.NetNS) error {
						ctx := context.Background()
						if err := r.Restore(ctx, f, input); err != nil {
							return err
						}
						snap, err := r.Snapshot(ctx, f)
						if err != nil {
							return err
						}
						if got := snap.ChainRules(TableFilter, chain); len(got) != 1 || got[0] != rule.String() {
							t.Errorf("iptables-save prints %q, Rule renders %q", got, rule.String())
						}
						if got := snap.Jumps(TableFilter, chain); len(got) != 1 || got[0] != "OUTPUT "+jump.String() {
							t.Errorf("jumps %q, want [%q]", got, "OUTPUT "+jump.String())
						}
						ipt, err := r.IPTables(f)
						if err != nil {
							return err
						}
						if ok, err := ipt.ChainExists(TableFilter, chain); err != nil || !ok {
							t.Errorf("go-iptables: ChainExists = %v, %v", ok, err)
						}
						bad := "*" + TableFilter + "\n-A NO-SUCH-CHAIN -j RETURN\nCOMMIT\n"
						err = r.Restore(ctx, f, bad)
						if err == nil || !strings.Contains(err.Error(), names.Restore) || !strings.Contains(err.Error(), "input:\n"+bad) {
							t.Errorf("failing restore: %v; want its program and input named", err)
						}
						// Clean up for the next round (a Restore that removes).
						return r.Restore(ctx, f, "*"+TableFilter+"\n"+Line("-D", "OUTPUT", jump)+"\n-F "+chain+"\n-X "+chain+"\nCOMMIT\n")
					})
					if err != nil {
						t.Fatalf("wait %s: %v", r.waitArg(), err)
					}
					want := map[string]int{names.Restore: 3, names.Save: 1, names.Iptables: 1}
					if got := r.Counts(); len(got) != len(want) || got[names.Restore] != 3 || got[names.Save] != 1 || got[names.Iptables] != 1 {
						t.Errorf("wait %s: counts %v, want %v", r.waitArg(), got, want)
					}
					if r.Total() != 5 || r.Elapsed() <= 0 {
						t.Errorf("Total %d, Elapsed %s", r.Total(), r.Elapsed())
					}
				}
			})
		}
	}
}
