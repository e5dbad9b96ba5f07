// Package hostguard installs, in the network namespace it runs in (the node's), a
// guard that keeps pods away from the metadata server even when they hold
// CAP_NET_ADMIN and flushed the per-pod rules the CNI plugin put in their netns:
//
//   - nat PREROUTING -> METACONCEAL-GUARD: DNAT of TCP to metadata:80 toward the
//     proxy's first listen address, and of TCP to metadata:8080 (the ALTS handshaker)
//     toward the ALTS relay's. PREROUTING sees only packets arriving from outside
//     (pods, other hosts), never host-originated ones.
//   - filter FORWARD -> METACONCEAL-GUARD: RETURN of DNS (UDP and TCP 53) and NTP (UDP
//     123), which GCE serves on the metadata address too, and REJECT of any other
//     traffic to the metadata addresses that the node would route on (pods on a real
//     node): TCP with a reset, the rest with ICMP port unreachable.
//   - filter INPUT ! -i lo -> METACONCEAL-GUARD: the same for packets that end at the
//     node because the metadata address is local to it (GKE's own metadata server,
//     the simulated node). Host processes use lo and OUTPUT: untouched.
//   - filter FORWARD and OUTPUT ! -o lo -> METACONCEAL-GUARD-FROM: REJECT (reset) of
//     TCP from metadata:80 and :8080 that opens a flow in conntrack's eyes (original
//     direction) or that conntrack finds invalid. The server never opens connections
//     from those ports: such a packet belongs to a pod's connection whose conntrack
//     entry Install deleted (below), and must not reach the pod.
//
// When Install finds pod connections to metadata:80 or :8080 that reached the server
// directly (the node ran without the guard), it deletes their conntrack entries, so
// that a keep-alive connection or a held long poll cannot go on reading: the pod's
// next packet is redirected to the proxy (which resets it) and the server's next
// packet is rejected. Node-originated connections are left alone.
//
// The proxy's and the relay's listen addresses are put on lo when missing, with scope
// host (as GKE does, so the node never picks them as a source address) and, for IPv4,
// the label "lo:mcguard" so that Remove takes away only what Install added.
//
// Install is idempotent and applies each family's rules with one
// `iptables-restore --noflush` (atomic), run by pkg/xtables as for the per-pod rules,
// with the same backend names; it waits for the xtables lock as long as the context
// allows. The guard stays when the proxy stops, so a
// restart opens no window; only Remove takes it away.
//
// With the connection limit on (limit.go) the guard also has ChainLimit in filter and,
// ahead of it, ChainSource in raw (a reverse-path check, so that forged sources cannot
// fill the limit's hash table).
//
// Guard (reconcile.go) is the guard as desired state with one lifecycle: Install, the
// anti-spoofing chain (spoof.go) and a pass every few seconds that puts back whatever
// someone removed.
package hostguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/xtables"
	"github.com/vishvananda/netlink"
)

// Chain is the name of the guard's own chain, in both the nat and filter tables.
const Chain = "METACONCEAL-GUARD"

// ChainFrom is the filter chain that rejects TCP from the metadata server's ports
// that does not belong to a connection conntrack knows (see the package comment).
const ChainFrom = "METACONCEAL-GUARD-FROM"

// AddrLabel marks the IPv4 addresses Install put on lo. The kernel requires an IPv4
// label to start with the interface name; IPv6 addresses carry no label.
const AddrLabel = "lo:mcguard"

// ruleComment tags every guard rule in iptables-save output.
const ruleComment = "metaconceal host guard"

// Config says what to guard and where to send it.
type Config struct {
	// ListenAddrs are the proxy's listen addresses; TCP to the metadata port is
	// DNATed to the first one of the same family, and each is put on lo if missing.
	ListenAddrs []netip.AddrPort
	// MetadataAddrs are the metadata server's addresses (default 169.254.169.254).
	MetadataAddrs []netip.Addr
	// MetadataPort is the metadata server's port (default 80).
	MetadataPort uint16
	// ALTSListenAddrs are the ALTS relay's listen addresses; TCP to the metadata
	// addresses' ALTSPort is DNATed to the first one of the same family, and each is
	// put on lo if missing. Without one of a family, that port is rejected.
	ALTSListenAddrs []netip.AddrPort
	// ALTSPort is the ALTS handshaker's port on the metadata server (default 8080).
	ALTSPort uint16
	// ConnRate limits, per source IP, new TCP connections per second to each listen
	// address (the proxy's and the relay's) in ChainLimit; 0 turns the limit off.
	ConnRate uint32
	// ConnBurst is how many new connections a source may open at once before
	// ConnRate applies (1-10000 when ConnRate is set).
	ConnBurst uint32
	// Attest are the ports of the attested listeners (attest.go); zero is
	// DefaultAttestPorts.
	Attest AttestPorts
	// KeepConntrack skips deleting the conntrack entries of pod connections that
	// reached the metadata server directly (tests that inspect them use it).
	KeepConntrack bool
	// Backend selects the iptables programs (pkg/xtables); empty is
	// xtables.BackendAuto, iptables on PATH.
	Backend xtables.Backend
}

// DefaultMetadataAddr is GCE's metadata server address.
var DefaultMetadataAddr = gce.MetadataIPv4

func (c Config) normalized() (Config, error) {
	if len(c.ListenAddrs) == 0 {
		return c, errors.New("hostguard: no listen address to redirect to")
	}
	if err := checkTargets("listen address", c.ListenAddrs, gce.Proxy); err != nil {
		return c, err
	}
	if err := checkTargets("ALTS relay listen address", c.ALTSListenAddrs, gce.ALTSRelay); err != nil {
		return c, err
	}
	if len(c.MetadataAddrs) == 0 {
		c.MetadataAddrs = []netip.Addr{DefaultMetadataAddr}
	}
	if err := checkMetadataAddrs(c.MetadataAddrs); err != nil {
		return c, err
	}
	if c.MetadataPort == 0 {
		c.MetadataPort = gce.MetadataPort
	}
	if c.ALTSPort == 0 {
		c.ALTSPort = gce.ALTSPort
	}

	var err error
	if c.Attest, err = c.Attest.normalized(c); err != nil {
		return c, err
	}
	if err := validateConnLimit(c.ConnRate, c.ConnBurst); err != nil {
		return c, err
	}
	if c.Backend == "" {
		c.Backend = xtables.BackendAuto
	}
	if err := c.Backend.Validate(); err != nil {
		return c, fmt.Errorf("hostguard: %w", err)
	}
	return c, nil
}

// checkMetadataAddrs refuses guarded addresses that are not specific.
func checkMetadataAddrs(addrs []netip.Addr) error {
	for _, a := range addrs {
		if !a.IsValid() || a.IsUnspecified() {
			return fmt.Errorf("hostguard: metadata address %q is not a specific address", a)
		}
	}
	return nil
}

// checkTargets validates listen addresses of which the first of each family is a DNAT
// target.
func checkTargets(what string, addrs []netip.AddrPort, example netip.AddrPort) error {
	for _, ap := range addrs {
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().IsUnspecified() {
			return fmt.Errorf("hostguard: %s %q: want a specific address and a non-zero port", what, ap)
		}
	}
	seenFamily := map[bool]bool{}
	for _, ap := range addrs {
		v6 := ap.Addr().Unmap().Is6()
		if seenFamily[v6] {
			continue
		}
		seenFamily[v6] = true
		// The first address of each family is the DNAT target: the kernel drops
		// packets from pods DNATed to loopback (unless route_localnet is set).
		if ap.Addr().Unmap().IsLoopback() {
			return fmt.Errorf("hostguard: %s %s is a loopback address and cannot receive pod traffic redirected by DNAT: list a node-local address (e.g. %s) first", what, ap, example)
		}
	}
	return nil
}

// family is one IP family's view of the config and its programs.
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
		b.WriteString("*" + table + "\n")
		for _, c := range chains {
			if c.table == table {
				writeChain(&b, c)
			}
		}
		for _, l := range stale[table] {
			b.WriteString(l + "\n")
		}
		writeHooks(&b, table, hooks)
		b.WriteString(cleanup)
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// writeChain declares (creating it, or flushing it under --noflush), flushes and
// fills one guard chain.
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

// Install puts the guard in place in the current network namespace. Running it again
// rewrites the guard chains with the current config and adds nothing twice.
func Install(ctx context.Context, cfg Config, log *slog.Logger) error {
	cfg, err := cfg.normalized()
	if err != nil {
		return err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Addresses first: the DNAT target must be local before traffic is sent to it.
	if _, err := addListenAddrs(cfg, log); err != nil {
		return err
	}
	for _, f := range families(cfg) {
		if len(f.metadata) == 0 {
			continue
		}
		snap, err := f.run.Snapshot(ctx, f.fam)
		if err != nil {
			return fmt.Errorf("hostguard: %w", err)
		}
		stale, spoof := staleHooks(snap)
		f.limitExists = snap.HasChain(xtables.TableFilter, ChainLimit)
		f.sourceExists = snap.HasChain(xtables.TableRaw, ChainSource)
		if err := f.restore(ctx, f.installPayload(stale, spoof...)); err != nil {
			return err
		}
		log.Info("host guard installed", "iptables", f.names.Iptables, "metadata", f.metadata,
			"port", cfg.MetadataPort, "redirect_to", f.target.String(), "alts_port", cfg.ALTSPort, "alts_relay", f.altsTarget.String(),
			"jumps_replaced", len(stale[xtables.TableRaw])+len(stale[xtables.TableNAT])+len(stale[xtables.TableFilter])-len(spoof),
			"conn_rate_per_source", cfg.ConnRate, "conn_burst_per_source", cfg.ConnBurst)
		if !f.target.IsValid() {
			log.Warn("no listen address of this family: metadata traffic of this family is rejected, not redirected", "iptables", f.names.Iptables)
		}
	}
	if cfg.KeepConntrack {
		return nil
	}
	// After the rules: a connection deleted now cannot come back unguarded.
	n, err := deleteDirectPodConnections(cfg)
	if err != nil {
		return err
	}
	if n > 0 {
		log.Warn("pod connections that reached the metadata server directly were cut", "conntrack_entries_deleted", n)
	}
	return nil
}

// Remove takes the guard away: the jumps, both guard chains, and the lo addresses
// that carry AddrLabel. Addresses that were there before Install stay. Removing a
// guard that is not installed is not an error.
func Remove(ctx context.Context, cfg Config, log *slog.Logger) error {
	cfg, err := cfg.normalized()
	if err != nil {
		return err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var errs []error
	for _, f := range families(cfg) {
		if _, err := f.run.Tools(f.fam); err != nil && len(f.metadata) == 0 {
			// No address of this family was configured and the node has no tool
			// for it: nothing of ours can be there.
			continue
		}
		if err := f.remove(ctx, log); err != nil {
			if len(f.metadata) == 0 {
				// Not configured for this family, so most likely never installed
				// in it: a node without ip6tables support must still uninstall.
				log.Warn("could not check for a host guard of an unconfigured family", "iptables", f.names.Iptables, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	errs = append(errs, removeSpoof(ctx, cfg, log), removeListenAddrs(cfg, log), removeGeneration(ctx, cfg))
	return errors.Join(errs...)
}

func (f family) remove(ctx context.Context, log *slog.Logger) error {
	ipt, err := f.ipt()
	if err != nil {
		return err
	}
	var b strings.Builder
	removed := 0
	for _, table := range tableOrder {
		var existing []string
		for _, c := range tableChains[table] {
			exists, err := ipt.ChainExists(table, c)
			if err != nil {
				return fmt.Errorf("hostguard: %s: looking for chain %s in %s: %w", f.names.Iptables, c, table, err)
			}
			if exists {
				existing = append(existing, c)
			}
		}
		lines, err := f.existingJumps(ipt, table)
		if err != nil {
			return err
		}
		if len(existing) == 0 && len(lines) == 0 {
			continue
		}
		b.WriteString("*" + table + "\n")
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
		for _, c := range existing {
			b.WriteString("-F " + c + "\n-X " + c + "\n")
		}
		b.WriteString("COMMIT\n")
		removed += len(lines)
	}
	if b.Len() == 0 {
		log.Info("host guard not present", "iptables", f.names.Iptables)
		return nil
	}
	if err := f.restore(ctx, b.String()); err != nil {
		return err
	}
	log.Info("host guard removed", "iptables", f.names.Iptables, "jumps_removed", removed)
	return nil
}

// addListenAddrs puts the listen addresses that are missing on lo and returns them.
func addListenAddrs(cfg Config, log *slog.Logger) ([]netip.Addr, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("hostguard: finding lo: %w", err)
	}
	var added []netip.Addr
	for _, ap := range append(slices.Clone(cfg.ListenAddrs), cfg.ALTSListenAddrs...) {
		a := ap.Addr().Unmap()
		present, err := addrPresent(a)
		if err != nil {
			return added, err
		}
		if present {
			continue
		}
		if a.Is6() {
			// IPv6 addresses carry no label, so Remove could not tell ours apart.
			return added, fmt.Errorf("hostguard: listen address %s is not on this node and the guard adds only IPv4 addresses: put it on lo first", a)
		}
		// Scope host, as GKE does: the kernel never picks it as a source address for
		// the node's own traffic, and it still receives what is DNATed to it.
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}, Label: AddrLabel, Scope: int(netlink.SCOPE_HOST)}
		if err := netlink.AddrAdd(lo, addr); err != nil {
			return added, fmt.Errorf("hostguard: adding listen address %s to lo: %w", a, err)
		}
		added = append(added, a)
		log.Info("listen address added to lo", "addr", a.String(), "label", AddrLabel, "scope", "host")
	}
	return added, nil
}

// addrPresent reports whether a is configured on any interface.
func addrPresent(a netip.Addr) (bool, error) {
	fam := netlink.FAMILY_V4
	if a.Is6() {
		fam = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(nil, fam)
	if err != nil {
		return false, fmt.Errorf("hostguard: listing addresses: %w", err)
	}
	for _, x := range addrs {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
			return true, nil
		}
	}
	return false, nil
}

func removeListenAddrs(_ Config, log *slog.Logger) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("hostguard: finding lo: %w", err)
	}
	addrs, err := netlink.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("hostguard: listing lo addresses: %w", err)
	}
	var errs []error
	for _, x := range addrs {
		if x.Label != AddrLabel {
			continue
		}
		if err := netlink.AddrDel(lo, &x); err != nil {
			errs = append(errs, fmt.Errorf("hostguard: removing %s from lo: %w", x.IPNet, err))
			continue
		}
		log.Info("listen address removed from lo", "addr", x.IP.String())
	}
	return errors.Join(errs...)
}
