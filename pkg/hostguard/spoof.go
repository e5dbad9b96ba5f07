package hostguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"unicode"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"

	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// SpoofChain is the filter chain that INPUT jumps to for traffic to the proxy's and the
// relay's listen addresses. It drops TCP to the attested ports (attest.go) that no
// DNAT of AttestPodChain or AttestExposedChain sent there: only the kernel's
// attestation at connection set-up leads to them.
//
// The per-attachment part, AttestChain, matches each attachment's host interface:
//   - bridge (the host veth is a bridge port): `-m physdev --physdev-in`, which needs
//     br_netfilter with net.bridge.bridge-nf-call-iptables (and -ip6tables) = 1 in the
//     node netns, as Kubernetes requires anyway. Where it is 0, a bridged pod's
//     connections are not attested: unattributed.
//   - routed veths (ptp, Calico style): the host veth is the ingress interface itself
//     (`-i`); the route to the pod's IP points at it.
//   - no host interface known (an older record, a main plugin that reports none, an
//     interface that is gone): not attested, so unattributed (fail closed).
const SpoofChain = "METACONCEAL-SPOOF"

// spoofComment tags the SpoofChain rules in iptables-save output.
const spoofComment = "metaconceal anti-spoof"

// SpoofGuard keeps the attestation part of the guard (AttestChain, AttestPodChain,
// AttestExposedChain in nat, SpoofChain in filter) in line with the state records. It
// is safe for concurrent use; Attest calls are serialised.
type SpoofGuard struct {
	fams []spoofFamily
	log  *slog.Logger
	// NetnsPath, when set, is the network namespace Attest works in; empty means the
	// caller's (the proxy runs in the node's). Tests set it to a simulated node.
	NetnsPath string

	mu      sync.Mutex
	last    map[bool][]string // per family (v6): AttestChain's rules last applied; unchanged ones are not reapplied
	records []state.Record    // the records of the last Attest: the desired state the Guard re-asserts
	home    netnsID           // set by Guard: without NetnsPath, Attest runs only in that namespace
}

type spoofFamily struct {
	family
	dsts       []netip.Addr     // the proxy's and the relay's listen addresses of this family
	listen     []netip.AddrPort // the proxy's listen addresses of this family
	altsListen []netip.AddrPort // the relay's
	ports      AttestPorts
}

// NewSpoofGuard returns the attestation part of the guard for cfg. Nothing is changed
// until Attest.
func NewSpoofGuard(cfg Config, log *slog.Logger) (*SpoofGuard, error) {
	cfg, err := cfg.normalized()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &SpoofGuard{log: log, last: map[bool][]string{}}
	for _, f := range families(cfg) {
		sf := spoofFamily{family: f, ports: cfg.Attest}
		for _, ap := range slices.Concat(cfg.ListenAddrs, cfg.ALTSListenAddrs) {
			if a := ap.Addr().Unmap(); a.Is6() == f.v6 && !slices.Contains(sf.dsts, a) {
				sf.dsts = append(sf.dsts, a)
			}
		}
		sf.listen = familyAddrs(cfg.ListenAddrs, f.v6)
		sf.altsListen = familyAddrs(cfg.ALTSListenAddrs, f.v6)
		if len(sf.dsts) > 0 {
			g.fams = append(g.fams, sf)
		}
	}
	return g, nil
}

// familyAddrs are the addresses of one family in addrs, unmapped, each once.
func familyAddrs(addrs []netip.AddrPort, v6 bool) []netip.AddrPort {
	var out []netip.AddrPort
	for _, ap := range addrs {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if ap.Addr().Is6() == v6 && !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out
}

// ingress is how one claimed interface is matched.
type ingress struct {
	name       string
	bridgePort bool
}

// inspect resolves the claimed interfaces of one IP in the current netns; ifaces that
// are missing or not valid names are left out, with a reason.
type inspector struct {
	bridgeNF map[bool]bool // per family: br_netfilter passes bridged packets to ip(6)tables
}

func (in *inspector) resolve(v6 bool, names []string) ([]ingress, []string) {
	var (
		out      []ingress
		problems []string
	)
	for _, name := range names {
		if !validIfName(name) {
			problems = append(problems, fmt.Sprintf("interface name %q is not valid", name))
			continue
		}
		link, err := netlink.LinkByName(name)
		if err != nil {
			problems = append(problems, fmt.Sprintf("interface %s: %v", name, err))
			continue
		}
		port := false
		if m := link.Attrs().MasterIndex; m > 0 {
			if master, err := netlink.LinkByIndex(m); err == nil && master.Type() == "bridge" {
				port = true
			}
		}
		if port && !in.bridgeNF[v6] {
			problems = append(problems, fmt.Sprintf("interface %s is a bridge port, but bridged packets bypass ip(6)tables here (net.bridge.bridge-nf-call-ip%stables is not 1)", name, map[bool]string{false: "", true: "6"}[v6]))
			continue
		}
		out = append(out, ingress{name: name, bridgePort: port})
	}
	return out, problems
}

// validIfName is what Linux accepts as an interface name, less the names iptables
// would read as an option or a negation.
func validIfName(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." || s[0] == '-' || s[0] == '!' {
		return false
	}
	return !strings.ContainsFunc(s, func(r rune) bool { return r == '/' || r == ':' || unicode.IsSpace(r) || r > unicode.MaxASCII || r == 0 })
}

// bridgeNFCalls reads net.bridge.bridge-nf-call-ip(6)tables of the current netns.
func bridgeNFCalls(v6 bool) bool {
	name := "/proc/sys/net/bridge/bridge-nf-call-iptables"
	if v6 {
		name = "/proc/sys/net/bridge/bridge-nf-call-ip6tables"
	}
	b, err := os.ReadFile(name)
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// spoofJump is the INPUT rule that sends traffic to one listen address through the chain.
func spoofJump(dst netip.Addr) []string {
	return []string{"-d", xtables.HostPrefix(dst), "-m", "comment", "--comment", spoofComment, "-j", SpoofChain}
}

// ourJumps returns, as iptables-restore "-D" lines, every rule of table's builtin
// that jumps to chain.
func (f family) ourJumps(ipt *iptables.IPTables, table, builtin, chain string) ([]string, error) {
	rules, err := ipt.List(table, builtin)
	if err != nil {
		return nil, fmt.Errorf("hostguard: %s: listing %s %s: %w", f.names.Iptables, table, builtin, err)
	}
	var lines []string
	for _, r := range rules {
		if xtables.JumpsTo(r, chain) {
			lines = append(lines, "-D"+strings.TrimPrefix(r, "-A"))
		}
	}
	return lines, nil
}

// Attest rewrites AttestChain, in the current network namespace (the node's), so
// that connections to the proxy and the relay from each record's IPs, arriving on its
// host interface, are attested (see attest.go). Attachments whose interface cannot be
// matched are logged and left unattributed. Unchanged rules are not rewritten.
func (g *SpoofGuard) Attest(ctx context.Context, recs []state.Record) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	run := func() error { return g.attest(ctx, recs) }
	if g.NetnsPath == "" {
		return inHome(g.home, run)
	}
	var err error
	if nsErr := ns.WithNetNSPath(g.NetnsPath, func(ns.NetNS) error { err = run(); return nil }); nsErr != nil {
		return fmt.Errorf("hostguard: entering %s: %w", g.NetnsPath, nsErr)
	}
	return err
}

func (g *SpoofGuard) attest(ctx context.Context, recs []state.Record) error {
	g.records = recs
	in := newInspector()
	for _, f := range g.fams {
		rules, n, problems := attestRules(f.v6, recs, in.resolve)
		for key, probs := range problems {
			g.log.Warn("attachment's connections cannot be attested (served as unattributed)", "record", key, "problems", probs)
		}
		// Unchanged rules are not rewritten: the Guard's reconciliation (reconcile.go)
		// puts back what someone removed.
		if last, ok := g.last[f.v6]; ok && slices.Equal(last, rules) {
			continue
		}
		delete(g.last, f.v6)
		if err := f.apply(ctx, rules); err != nil {
			return err
		}
		g.last[f.v6] = rules
		g.log.Info("attestation rules updated", "iptables", f.names.Iptables, "records", len(recs), "rules", n)
	}
	return nil
}

func newInspector() *inspector {
	return &inspector{bridgeNF: map[bool]bool{false: bridgeNFCalls(false), true: bridgeNFCalls(true)}}
}

// hooks are the family's jumps into the attestation chains, top to bottom: nat
// PREROUTING into AttestChain, INPUT into SpoofChain (one per listen address).
func (f spoofFamily) hooks() []hookSpec {
	out := []hookSpec{attestJump}
	for _, d := range f.dsts {
		out = append(out, hook(xtables.TableFilter, "INPUT", spoofJump(d)))
	}
	return out
}

// chains are the family's attestation chains; attest are AttestChain's rules, and
// known says whether they are known (else only its existence counts).
func (f spoofFamily) chains(attest []string, known bool) []chainSpec {
	return []chainSpec{
		{table: xtables.TableNAT, name: AttestPodChain, rules: f.attestDNATs(AttestPodChain, false)},
		{table: xtables.TableNAT, name: AttestExposedChain, rules: f.attestDNATs(AttestExposedChain, true)},
		{table: xtables.TableNAT, name: AttestChain, rules: attest, anyRules: !known},
		{table: xtables.TableFilter, name: SpoofChain, rules: f.spoofRules()},
	}
}

// apply replaces the attestation chains' rules and their jumps in one
// iptables-restore (both tables).
func (f spoofFamily) apply(ctx context.Context, attest []string) error {
	ipt, err := f.ipt()
	if err != nil {
		return err
	}
	staleNAT, err := f.ourJumps(ipt, xtables.TableNAT, "PREROUTING", AttestChain)
	if err != nil {
		return err
	}
	staleFilter, err := f.ourJumps(ipt, xtables.TableFilter, "INPUT", SpoofChain)
	if err != nil {
		return err
	}
	stale := map[string][]string{xtables.TableNAT: staleNAT, xtables.TableFilter: staleFilter}
	chains, hooks := f.chains(attest, true), f.hooks()
	var b strings.Builder
	for _, table := range []string{xtables.TableNAT, xtables.TableFilter} {
		writeTable(&b, table, chains, stale[table], hooks, "")
	}
	return f.restore(ctx, b.String())
}

// removeSpoof takes the attestation chains and their jumps away in every family (part of Remove).
func removeSpoof(ctx context.Context, cfg Config, log *slog.Logger) error {
	var errs []error
	for _, f := range families(cfg) {
		if _, err := f.run.Tools(f.fam); err != nil && len(f.metadata) == 0 {
			continue
		}
		if err := f.removeSpoof(ctx, log); err != nil {
			if len(f.metadata) == 0 {
				log.Warn("could not check for anti-spoofing rules of an unconfigured family", "iptables", f.names.Iptables, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (f family) removeSpoof(ctx context.Context, log *slog.Logger) error {
	ipt, err := f.ipt()
	if err != nil {
		return err
	}
	var b strings.Builder
	removed := 0
	for _, t := range []struct {
		table, builtin string
		chains         []string
	}{
		{xtables.TableNAT, "PREROUTING", []string{AttestChain, AttestPodChain, AttestExposedChain}},
		{xtables.TableFilter, "INPUT", []string{SpoofChain}},
	} {
		lines, err := f.ourJumps(ipt, t.table, t.builtin, t.chains[0])
		if err != nil {
			return err
		}
		var existing []string
		for _, c := range t.chains {
			exists, err := ipt.ChainExists(t.table, c)
			if err != nil {
				return fmt.Errorf("hostguard: %s: looking for chain %s: %w", f.names.Iptables, c, err)
			}
			if exists {
				existing = append(existing, c)
			}
		}
		if len(existing) == 0 && len(lines) == 0 {
			continue
		}
		b.WriteString("*" + t.table + "\n")
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
		for _, c := range existing { // flush all first: AttestChain jumps to the others
			b.WriteString("-F " + c + "\n")
		}
		for _, c := range existing {
			b.WriteString("-X " + c + "\n")
		}
		b.WriteString("COMMIT\n")
		removed += len(lines)
	}
	if b.Len() == 0 {
		return nil
	}
	if err := f.restore(ctx, b.String()); err != nil {
		return err
	}
	log.Info("attestation rules removed", "iptables", f.names.Iptables, "jumps_removed", removed)
	return nil
}
