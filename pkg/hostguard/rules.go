package hostguard

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

type family struct {
	v6         bool
	fam        xtables.Family
	metadata   []netip.Addr
	port       uint16
	altsPort   uint16
	target     netip.AddrPort // DNAT target; invalid when no listen address of this family
	altsTarget netip.AddrPort // ALTS DNAT target; invalid when none of this family
	names      xtables.Tools  // program names, for logs
	// limitTargets, connRate, connBurst: ChainLimit (limit.go); limitExists says
	// whether the chain is there before Install.
	limitTargets        []netip.AddrPort
	connRate, connBurst uint32
	limitExists         bool
	sourceExists        bool            // ChainSource exists before Install
	run                 *xtables.Runner // shared by the families of one families() call
}

// firstOf returns the first address of the family in addrs, unmapped.
func firstOf(addrs []netip.AddrPort, v6 bool) netip.AddrPort {
	for _, ap := range addrs {
		if ap.Addr().Unmap().Is6() == v6 {
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	return netip.AddrPort{}
}

// families splits a normalized config by family. The families share one Runner whose
// processes wait for the xtables lock as long as the context allows.
func families(c Config) []family {
	var fams []family
	run := &xtables.Runner{Backend: c.Backend}
	for _, fam := range xtables.Families {
		v6 := fam == xtables.IPv6
		f := family{v6: v6, fam: fam, port: c.MetadataPort, altsPort: c.ALTSPort, run: run,
			target: firstOf(c.ListenAddrs, v6), altsTarget: firstOf(c.ALTSListenAddrs, v6),
			limitTargets: limitTargets(c, v6), connRate: c.ConnRate, connBurst: c.ConnBurst}
		for _, a := range c.MetadataAddrs {
			if a.Unmap().Is6() == v6 {
				f.metadata = append(f.metadata, a.Unmap())
			}
		}
		f.names, _ = xtables.Names(c.Backend, fam) // c is normalized: the backend is known
		fams = append(fams, f)
	}
	return fams
}

// hookSpec is one rule of a built-in chain that sends traffic into one of the guard's
// chains: its table, the built-in chain and its arguments as iptables-save prints them.
type hookSpec struct {
	table, builtin string
	spec           string
}

// line is the hook as an iptables-save line: "-A BUILTIN spec".
func (h hookSpec) line() string { return "-A " + h.builtin + " " + h.spec }

func hook(table, builtin string, r xtables.Rule) hookSpec {
	return hookSpec{table: table, builtin: builtin, spec: r.String()}
}

// chainSpec is one of the guard's own chains with its rules as iptables-save prints
// them ("-A NAME ..."); anyRules says the rules are not known (only the chain's
// existence is checked, and a missing chain is created empty).
type chainSpec struct {
	table, name string
	rules       []string
	anyRules    bool
}

// guardComment is the comment every rule of the guard's own chains carries.
var guardComment = []string{"-m", "comment", "--comment", ruleComment}

// The guard's jumps that do not depend on the config.
var (
	natJump     = hook(xtables.TableNAT, "PREROUTING", xtables.Rule{"-m", "comment", "--comment", ruleComment, "-j", Chain})
	forwardJump = hook(xtables.TableFilter, "FORWARD", xtables.Rule{"-m", "comment", "--comment", ruleComment, "-j", Chain})
	fromJump    = hook(xtables.TableFilter, "FORWARD", xtables.Rule{"-m", "comment", "--comment", ruleComment, "-j", ChainFrom})
	outputJump  = hook(xtables.TableFilter, "OUTPUT", xtables.Rule{"!", "-o", "lo", "-m", "comment", "--comment", ruleComment, "-j", ChainFrom})
	inputJump   = hook(xtables.TableFilter, "INPUT", xtables.Rule{"!", "-i", "lo", "-m", "comment", "--comment", ruleComment, "-j", Chain})
)

// baseHooks are the jumps every installed guard has, whatever its config.
var baseHooks = []hookSpec{natJump, forwardJump, fromJump, inputJump, outputJump}

// tableChains are the guard's own chains, per table (SpoofChain is spoof.go's).
// ChainLimit and ChainSource are there only while the connection limit is on
// (limit.go).
var tableChains = map[string][]string{
	xtables.TableRaw:    {ChainSource},
	xtables.TableNAT:    {Chain},
	xtables.TableFilter: {Chain, ChainFrom, ChainLimit},
}

// spoofChains are the chains of the attestation part (spoof.go, attest.go) that
// built-in chains jump to, per table.
var spoofChains = map[string][]string{
	xtables.TableNAT:    {AttestChain},
	xtables.TableFilter: {SpoofChain},
}

// tableOrder is the order of the tables in a restore input.
var tableOrder = []string{xtables.TableRaw, xtables.TableNAT, xtables.TableFilter}

// ipt is a go-iptables handle on the family's iptables program, for queries.
func (f family) ipt() (*iptables.IPTables, error) {
	ipt, err := f.run.IPTables(f.fam)
	if err != nil {
		return nil, fmt.Errorf("hostguard: %w", err)
	}
	return ipt, nil
}

// restore applies payload with one iptables-restore --noflush of the family.
func (f family) restore(ctx context.Context, payload string) error {
	if err := f.run.Restore(ctx, f.fam, payload); err != nil {
		return fmt.Errorf("hostguard: %w", err)
	}
	return nil
}

// natRules are the rules of Chain in the nat table: the DNATs.
func (f family) natRules() []string {
	var rules []string
	dnats := []struct {
		port uint16
		to   netip.AddrPort
	}{{f.port, f.target}}
	if f.altsPort != f.port { // an upstream on the ALTS port: the proxy gets it
		dnats = append(dnats, struct {
			port uint16
			to   netip.AddrPort
		}{f.altsPort, f.altsTarget})
	}
	for _, a := range f.metadata {
		for _, d := range dnats {
			if !d.to.IsValid() {
				continue // no target of this family: the filter table rejects it
			}
			spec := append([]string{"-d", xtables.HostPrefix(a), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(d.port)}, guardComment...)
			spec = append(spec, "-j", "DNAT", "--to-destination", d.to.String()) // 1.2.3.4:988 or [fd00::1]:988
			rules = append(rules, xtables.Line("-A", Chain, spec))
		}
	}
	return rules
}

// filterRules are the rules of Chain in the filter table: DNS and NTP pass, the rest
// to the metadata addresses is rejected.
func (f family) filterRules() []string {
	var rules []string
	for _, a := range f.metadata {
		// DNS and NTP pass: GCE serves them on the metadata address.
		for _, p := range gce.PassPorts {
			spec := append([]string{"-d", xtables.HostPrefix(a), "-p", p.Proto, "-m", p.Proto, "--dport", fmt.Sprint(p.Port)}, guardComment...)
			rules = append(rules, xtables.Line("-A", Chain, append(spec, "-j", "RETURN")))
		}
		tcp := append([]string{"-d", xtables.HostPrefix(a), "-p", "tcp"}, guardComment...)
		rules = append(rules, xtables.Line("-A", Chain, append(tcp, "-j", "REJECT", "--reject-with", "tcp-reset")))
		other := append([]string{"-d", xtables.HostPrefix(a)}, guardComment...)
		rules = append(rules, xtables.Line("-A", Chain, append(other, "-j", "REJECT", "--reject-with", xtables.RejectWith(f.fam))))
	}
	return rules
}

// fromRules are the rules of ChainFrom.
func (f family) fromRules() []string {
	var rules []string
	for _, a := range f.metadata {
		// Picked up mid-stream (nf_conntrack_tcp_loose, the default): original
		// direction. Not picked up (loose off): invalid.
		for _, ct := range [][]string{{"--ctdir", "ORIGINAL"}, {"--ctstate", "INVALID"}} {
			spec := []string{"-s", xtables.HostPrefix(a), "-p", "tcp", "-m", "multiport", "--sports", fmt.Sprintf("%d,%d", f.port, f.altsPort), "-m", "conntrack"}
			spec = append(append(spec, ct...), guardComment...)
			rules = append(rules, xtables.Line("-A", ChainFrom, append(spec, "-j", "REJECT", "--reject-with", "tcp-reset")))
		}
	}
	return rules
}

// chains are the family's guard chains with their rules, in restore order.
func (f family) chains() []chainSpec {
	var out []chainSpec
	if f.limitOn() {
		out = append(out, chainSpec{table: xtables.TableRaw, name: ChainSource, rules: f.sourceRules()})
	}
	out = append(out,
		chainSpec{table: xtables.TableNAT, name: Chain, rules: f.natRules()},
		chainSpec{table: xtables.TableFilter, name: Chain, rules: f.filterRules()},
		chainSpec{table: xtables.TableFilter, name: ChainFrom, rules: f.fromRules()})
	if f.limitOn() {
		out = append(out, chainSpec{table: xtables.TableFilter, name: ChainLimit, rules: f.limitRules()})
	}
	return out
}

// hooks are the family's jumps into the guard, each built-in chain's top to bottom.
// In INPUT the anti-spoofing jumps (spoof, one per listen address; spoof.go) come
// first, then the connection limit, then the guard: anti-spoofing runs before the
// limit's hash table sees a source (issue 17).
func (f family) hooks(spoof []hookSpec) []hookSpec {
	var out []hookSpec
	if f.limitOn() {
		out = append(out, sourceJump)
	}
	for _, h := range spoof { // attestation decides before the guard's own DNAT
		if h.table == xtables.TableNAT {
			out = append(out, h)
		}
	}
	out = append(out, natJump, forwardJump, fromJump)
	for _, h := range spoof {
		if h.table != xtables.TableNAT {
			out = append(out, h)
		}
	}
	if f.limitOn() {
		out = append(out, limitJump)
	}
	return append(out, inputJump, outputJump)
}

// installPayload is the iptables-restore input that (re)writes the guard chains,
// deletes the jumps that are there (stale, as "-D" lines per table) and inserts fresh
// ones at the top of their chains: whatever the state before, one transaction per
// table leaves exactly one set of rules, first in line. spoof are anti-spoofing jumps
// to put back above the others (Install keeps the ones it finds).
func (f family) installPayload(stale map[string][]string, spoof ...hookSpec) string {
	var b strings.Builder
	chains, hooks := f.chains(), f.hooks(spoof)
	for _, table := range tableOrder {
		cleanup := f.cleanup(table)
		if !slices.ContainsFunc(chains, func(c chainSpec) bool { return c.table == table }) && len(stale[table]) == 0 && cleanup == "" {
			continue
		}
		writeTable(&b, table, chains, stale[table], hooks, cleanup)
	}
	return b.String()
}

// writeChain declares (creating it, or flushing it under --noflush), flushes and
// fills one guard chain.
// writeTable renders one table's part of a restore payload: its chains among chains
// (flushed and written whole), the lines in stale, the jumps, then extra.
func writeTable(b *strings.Builder, table string, chains []chainSpec, stale []string, hooks []hookSpec, extra string) {
	b.WriteString("*" + table + "\n")
	for _, c := range chains {
		if c.table == table {
			writeChain(b, c)
		}
	}
	for _, l := range stale {
		b.WriteString(l + "\n")
	}
	writeHooks(b, table, hooks)
	b.WriteString(extra)
	b.WriteString("COMMIT\n")
}

func writeChain(b *strings.Builder, c chainSpec) {
	b.WriteString(":" + c.name + " - [0:0]\n-F " + c.name + "\n")
	for _, r := range c.rules {
		b.WriteString(r + "\n")
	}
}

// writeHooks inserts the table's hooks at the top of their built-in chains so that
// each chain reads top to bottom in the order of hooks.
func writeHooks(b *strings.Builder, table string, hooks []hookSpec) {
	for _, builtin := range builtins[table] {
		for i := len(hooks) - 1; i >= 0; i-- {
			if h := hooks[i]; h.table == table && h.builtin == builtin {
				b.WriteString("-I " + builtin + " 1 " + h.spec + "\n")
			}
		}
	}
}

// builtins are the built-in chains the guard jumps from, per table.
var builtins = map[string][]string{
	xtables.TableRaw:    {"PREROUTING"},
	xtables.TableNAT:    {"PREROUTING"},
	xtables.TableFilter: {"FORWARD", "INPUT", "OUTPUT"},
}

// existingJumps returns, as iptables-restore "-D" lines, every rule of the table's
// built-in chains that jumps to the guard chain, duplicates and older spellings
// included.
func (f family) existingJumps(ipt *iptables.IPTables, table string) ([]string, error) {
	var lines []string
	for _, builtin := range builtins[table] {
		rules, err := ipt.List(table, builtin)
		if err != nil {
			return nil, fmt.Errorf("hostguard: %s: listing %s %s: %w", f.names.Iptables, table, builtin, err)
		}
		for _, r := range rules {
			// List gives "-A CHAIN spec..." in iptables-save syntax: the same spec
			// after -D deletes exactly that rule.
			if jumpsToAny(r, tableChains[table]) {
				lines = append(lines, "-D"+strings.TrimPrefix(r, "-A"))
			}
		}
	}
	return lines, nil
}

// jumpsToAny reports whether rule jumps or goes to one of chains.
func jumpsToAny(rule string, chains []string) bool {
	return slices.ContainsFunc(chains, func(c string) bool { return xtables.JumpsTo(rule, c) })
}

// staleHooks returns, from one iptables-save of the family, every rule of a built-in
// chain that jumps into the guard or its anti-spoofing chain (duplicates and older
// spellings included) as "-D" lines per table, and the anti-spoofing jumps among them
// as hooks to put back, top to bottom.
func staleHooks(snap xtables.Snapshot) (stale map[string][]string, spoof []hookSpec) {
	stale = map[string][]string{}
	for _, table := range tableOrder {
		ours := slices.Concat(tableChains[table], spoofChains[table])
		for _, builtin := range builtins[table] {
			for _, r := range snap.ChainRules(table, builtin) {
				if !jumpsToAny(" "+r, ours) {
					continue
				}
				stale[table] = append(stale[table], "-D "+builtin+" "+r)
				if jumpsToAny(" "+r, spoofChains[table]) {
					spoof = append(spoof, hookSpec{table: table, builtin: builtin, spec: r})
				}
			}
		}
	}
	return stale, spoof
}
