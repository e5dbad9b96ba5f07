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

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// SpoofChain is the anti-spoofing chain in the filter table. INPUT jumps to it for
// traffic to the proxy's listen addresses (pods' metadata traffic arrives there after
// the guard's DNAT). For every exposed pod IP it lets traffic through only when it
// arrives on the pod's own host-side interface, and drops the rest: a pod that spoofs
// an exposed pod's IP (ARP and its own TCP with CAP_NET_RAW, or an IP alias) cannot
// borrow its exposed access.
//
// Assumptions, per main plugin:
//   - bridge (the host veth is a bridge port): the ingress port is matched with
//     `-m physdev --physdev-in`, which needs br_netfilter with
//     net.bridge.bridge-nf-call-iptables (and -ip6tables) = 1 in the node netns, as
//     Kubernetes requires anyway. Where it is 0, a bridged pod's IP is not protected
//     and the proxy serves that pod as concealed.
//   - routed veths (ptp, Calico style): the host veth is the ingress interface itself
//     (`-i`); the route to the pod's IP points at it.
//   - no host interface known (an older record, a main plugin that reports none, an
//     interface that is gone): the IP is not protected and the proxy serves it as
//     concealed (fail closed).
const SpoofChain = "METACONCEAL-SPOOF"

// spoofComment tags the anti-spoofing rules in iptables-save output.
const spoofComment = "metaconceal anti-spoof"

// Claims maps an exposed pod IP to the host-side interfaces its traffic may arrive
// through (normally one; two when two state records claim the IP).
type Claims = map[netip.Addr][]string

// SpoofGuard keeps SpoofChain in line with the exposed pods. It is safe for concurrent
// use; Protect calls are serialised.
type SpoofGuard struct {
	fams []spoofFamily
	log  *slog.Logger
	// NetnsPath, when set, is the network namespace Protect works in; empty means the
	// caller's (the proxy runs in the node's). Tests set it to a simulated node.
	NetnsPath string

	mu     sync.Mutex
	last   map[bool][]string // per family (v6): the rules last applied; unchanged ones are not reapplied
	claims Claims            // the claims of the last Protect: the desired state the Guard re-asserts
	home   netnsID           // set by Guard: without NetnsPath, Protect runs only in that namespace
}

type spoofFamily struct {
	family
	dsts []netip.Addr // the proxy's listen addresses of this family
}

// NewSpoofGuard returns the anti-spoofing guard for cfg's listen addresses (the
// proxy's and the ALTS relay's). Nothing is changed until Protect.
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
		sf := spoofFamily{family: f}
		for _, ap := range slices.Concat(cfg.ListenAddrs, cfg.ALTSListenAddrs) {
			if a := ap.Addr().Unmap(); a.Is6() == f.v6 && !slices.Contains(sf.dsts, a) {
				sf.dsts = append(sf.dsts, a)
			}
		}
		if len(sf.dsts) > 0 {
			g.fams = append(g.fams, sf)
		}
	}
	return g, nil
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

// spoofRules renders the chain's rules for the claims of one family, and says which
// IPs they protect. IPs are rendered in order, so equal claims give equal rules.
func spoofRules(v6 bool, claims Claims, resolve func(v6 bool, names []string) ([]ingress, []string)) ([]string, map[netip.Addr]bool, map[netip.Addr][]string) {
	ips := make([]netip.Addr, 0, len(claims))
	for ip := range claims {
		if ip.Unmap().Is6() == v6 {
			ips = append(ips, ip)
		}
	}
	slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
	var rules []string
	protected := map[netip.Addr]bool{}
	problems := map[netip.Addr][]string{}
	comment := []string{"-m", "comment", "--comment", spoofComment}
	for _, ip := range ips {
		ins, probs := resolve(v6, claims[ip])
		if len(probs) > 0 {
			problems[ip] = probs
		}
		if len(ins) == 0 {
			continue // nothing to let through: not protected, so not served as exposed
		}
		src := []string{"-s", xtables.HostPrefix(ip.Unmap())}
		for _, in := range ins {
			match := []string{"-i", in.name}
			if in.bridgePort {
				match = []string{"-m", "physdev", "--physdev-in", in.name}
			}
			rules = append(rules, xtables.Line("-A", SpoofChain, slices.Concat(src, match, comment, []string{"-j", "RETURN"})))
		}
		rules = append(rules, xtables.Line("-A", SpoofChain, slices.Concat(src, comment, []string{"-j", "DROP"})))
		protected[ip.Unmap()] = true
	}
	return rules, protected, problems
}

// spoofJump is the INPUT rule that sends traffic to one listen address through the chain.
func spoofJump(dst netip.Addr) []string {
	return []string{"-d", xtables.HostPrefix(dst), "-m", "comment", "--comment", spoofComment, "-j", SpoofChain}
}

// spoofJumps returns, as iptables-restore "-D" lines, every INPUT rule that jumps to
// SpoofChain.
func (f family) spoofJumps(ipt *iptables.IPTables) ([]string, error) {
	rules, err := ipt.List("filter", "INPUT")
	if err != nil {
		return nil, fmt.Errorf("hostguard: %s: listing filter INPUT: %w", f.names.Iptables, err)
	}
	var lines []string
	for _, r := range rules {
		if xtables.JumpsTo(r, SpoofChain) {
			lines = append(lines, "-D"+strings.TrimPrefix(r, "-A"))
		}
	}
	return lines, nil
}

// Protect rewrites SpoofChain, in the current network namespace (the node's), so that
// traffic to the proxy from each claimed IP is accepted only through one of its
// interfaces, and returns the IPs that are now protected. An IP that is not returned
// must not be served as exposed: its interface is unknown or cannot be matched. On
// error nothing is protected.
func (g *SpoofGuard) Protect(ctx context.Context, claims Claims) (map[netip.Addr]bool, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.NetnsPath == "" {
		var (
			protected map[netip.Addr]bool
			err       error
		)
		if homeErr := inHome(g.home, func() error { protected, err = g.protect(ctx, claims); return nil }); homeErr != nil {
			return nil, homeErr
		}
		return protected, err
	}
	var (
		protected map[netip.Addr]bool
		err       error
	)
	nsErr := ns.WithNetNSPath(g.NetnsPath, func(ns.NetNS) error {
		protected, err = g.protect(ctx, claims)
		return nil
	})
	if nsErr != nil {
		return nil, fmt.Errorf("hostguard: entering %s: %w", g.NetnsPath, nsErr)
	}
	return protected, err
}

func (g *SpoofGuard) protect(ctx context.Context, claims Claims) (map[netip.Addr]bool, error) {
	g.claims = claims
	in := newInspector()
	protected := map[netip.Addr]bool{}
	for _, f := range g.fams {
		rules, prot, problems := spoofRules(f.v6, claims, in.resolve)
		for ip, probs := range problems {
			g.log.Warn("exposed pod IP: some host interfaces cannot be matched; without any, it is served as concealed",
				"ip", ip.String(), "protected", prot[ip], "problems", probs)
		}
		// Unchanged rules are not rewritten: the Guard's reconciliation (reconcile.go)
		// puts back what someone removed.
		if last, ok := g.last[f.v6]; !ok || !slices.Equal(last, rules) {
			delete(g.last, f.v6)
			if err := f.applySpoof(ctx, rules, f.dsts); err != nil {
				return nil, err
			}
			g.last[f.v6] = rules
			g.log.Info("anti-spoofing rules updated", "iptables", f.names.Iptables, "exposed_ips", len(prot), "rules", len(rules))
		}
		for ip := range prot {
			protected[ip] = true
		}
	}
	return protected, nil
}

func newInspector() *inspector {
	return &inspector{bridgeNF: map[bool]bool{false: bridgeNFCalls(false), true: bridgeNFCalls(true)}}
}

// hooks are the family's INPUT jumps into SpoofChain, top to bottom.
func (f spoofFamily) hooks() []hookSpec {
	var out []hookSpec
	for _, d := range f.dsts {
		out = append(out, hook(xtables.TableFilter, "INPUT", spoofJump(d)))
	}
	return out
}

// applySpoof replaces the chain's rules and its jumps in one iptables-restore.
func (f spoofFamily) applySpoof(ctx context.Context, rules []string, dsts []netip.Addr) error {
	ipt, err := f.ipt()
	if err != nil {
		return err
	}
	stale, err := f.spoofJumps(ipt)
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("*filter\n:" + SpoofChain + " - [0:0]\n-F " + SpoofChain + "\n")
	for _, r := range rules {
		b.WriteString(r + "\n")
	}
	for _, l := range stale {
		b.WriteString(l + "\n")
	}
	for i := len(dsts) - 1; i >= 0; i-- { // top to bottom in the order of dsts
		b.WriteString(xtables.Line("-I", "INPUT", append([]string{"1"}, spoofJump(dsts[i])...)) + "\n")
	}
	b.WriteString("COMMIT\n")
	return f.restore(ctx, b.String())
}

// removeSpoof takes SpoofChain and its jumps away in every family (part of Remove).
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
	exists, err := ipt.ChainExists("filter", SpoofChain)
	if err != nil {
		return fmt.Errorf("hostguard: %s: looking for chain %s: %w", f.names.Iptables, SpoofChain, err)
	}
	lines, err := f.spoofJumps(ipt)
	if err != nil {
		return err
	}
	if !exists && len(lines) == 0 {
		return nil
	}
	var b strings.Builder
	b.WriteString("*filter\n")
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	if exists {
		b.WriteString("-F " + SpoofChain + "\n-X " + SpoofChain + "\n")
	}
	b.WriteString("COMMIT\n")
	if err := f.restore(ctx, b.String()); err != nil {
		return err
	}
	log.Info("anti-spoofing rules removed", "iptables", f.names.Iptables, "jumps_removed", len(lines))
	return nil
}
