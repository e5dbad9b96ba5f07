package hostguard

import (
	"slices"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// check compares one family's iptables-save with the guard's chains and jumps. It
// returns what is missing, for a log line, and per table that lacks something the
// restore commands (without *table and COMMIT) that put it back: the chains that
// differ are declared, flushed and refilled, and in a built-in chain whose guard
// jumps differ (ours: the chains whose jumps are the guard's, per table) those jumps
// are deleted and inserted again at the top, in order. Nothing else is touched.
//
// With exact false only presence counts: every chain exists (rules unchecked) and
// every jump is there somewhere in its built-in chain (Missing's check).
func check(snap xtables.Snapshot, chains []chainSpec, hooks []hookSpec, ours map[string][]string, exact bool) ([]string, map[string]string) {
	var missing []string
	blocks := map[string]string{}
	for _, table := range tableOrder {
		var b strings.Builder
		for _, c := range chains {
			if c.table != table {
				continue
			}
			switch {
			case !snap.HasChain(table, c.name):
				missing = append(missing, table+" chain "+c.name)
			case exact && !c.anyRules && !slices.Equal(savedRules(snap, table, c.name), c.rules):
				missing = append(missing, table+" chain "+c.name+" rules")
			default:
				continue
			}
			writeChain(&b, c)
		}
		for _, builtin := range builtins[table] {
			var want []string
			for _, h := range hooks {
				if h.table == table && h.builtin == builtin {
					want = append(want, h.spec)
				}
			}
			var have []string
			for _, r := range snap.ChainRules(table, builtin) {
				if jumpsToAny(" "+r, ours[table]) {
					have = append(have, r)
				}
			}
			lacking := 0
			for _, w := range want {
				if !slices.Contains(have, w) {
					missing = append(missing, table+" "+builtin+" jump to "+target(w))
					lacking++
				}
			}
			switch {
			case slices.Equal(have, want), !exact && lacking == 0:
				continue
			case lacking == 0:
				missing = append(missing, table+" "+builtin+" guard jumps out of order or duplicated")
			}
			for _, r := range have {
				b.WriteString("-D " + builtin + " " + r + "\n")
			}
			for i := len(want) - 1; i >= 0; i-- {
				b.WriteString("-I " + builtin + " 1 " + want[i] + "\n")
			}
		}
		if b.Len() > 0 {
			blocks[table] = b.String()
		}
	}
	return missing, blocks
}

// savedRules are chain's rules in the snapshot as "-A CHAIN ..." lines.
func savedRules(snap xtables.Snapshot, table, chain string) []string {
	var out []string
	for _, r := range snap.ChainRules(table, chain) {
		out = append(out, "-A "+chain+" "+r)
	}
	return out
}

// target is the chain a jump's spec jumps to.
func target(spec string) string {
	f := strings.Fields(spec)
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return spec
}

// Missing reports what snap (one family's iptables-save) lacks of the parts of the
// guard that every config has: Chain in nat and filter, ChainFrom in filter, and the
// jumps into them (present anywhere in their built-in chains). Nothing missing means
// an installed guard; the Guard's own check (Reconcile) also compares every rule with
// its config. pkg/nodegate's readiness check uses it.
func Missing(snap xtables.Snapshot) []string {
	chains := []chainSpec{
		{table: xtables.TableNAT, name: Chain, anyRules: true},
		{table: xtables.TableFilter, name: Chain, anyRules: true},
		{table: xtables.TableFilter, name: ChainFrom, anyRules: true},
	}
	missing, _ := check(snap, chains, baseHooks, tableChains, false)
	return missing
}
