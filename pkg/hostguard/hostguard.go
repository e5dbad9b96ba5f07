// Package hostguard installs, in the network namespace it runs in (the node's), a
// guard that keeps pods away from the metadata server even when they hold
// CAP_NET_ADMIN and flushed the per-pod rules the CNI plugin put in their netns:
//
//   - nat PREROUTING -> METACONCEAL-GUARD: DNAT of TCP to metadata:port toward the
//     proxy's first listen address. PREROUTING sees only packets arriving from
//     outside (pods, other hosts), never host-originated ones.
//   - filter FORWARD -> METACONCEAL-GUARD: REJECT of any other traffic to the metadata
//     addresses that the node would route on (pods on a real node).
//   - filter INPUT ! -i lo -> METACONCEAL-GUARD: the same REJECT for packets that end
//     at the node because the metadata address is local to it (GKE's own metadata
//     server, the simulated node). Host processes use lo and OUTPUT: untouched.
//
// The proxy's listen addresses are put on lo when missing, IPv4 ones with the label
// "lo:mcguard" so that Remove takes away only what Install added.
//
// Install is idempotent and applies each family's rules with one
// `iptables-restore --noflush` (atomic). The guard stays when the proxy stops, so a
// restart opens no window; only Remove takes it away.
package hostguard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/metaconceal/metaconceal/pkg/redirect"
	"github.com/vishvananda/netlink"
)

// Chain is the name of the guard's own chain, in both the nat and filter tables.
const Chain = "METACONCEAL-GUARD"

// AddrLabel marks the IPv4 addresses Install put on lo. The kernel requires an IPv4
// label to start with the interface name; IPv6 addresses carry no label.
const AddrLabel = "lo:mcguard"

// ruleComment tags every guard rule in iptables-save output.
const ruleComment = "metaconceal host guard"

// Backend selects the iptables binaries; the same names as the plugin's.
type Backend = redirect.Backend

const (
	// BackendDefault uses iptables / ip6tables as found on PATH (nf_tables on
	// current distributions).
	BackendDefault Backend = ""
	// BackendNFT uses iptables-nft / ip6tables-nft.
	BackendNFT = redirect.BackendNFT
	// BackendLegacy uses iptables-legacy / ip6tables-legacy, for nodes whose other
	// rules (kube-proxy, the CNI) are legacy ones.
	BackendLegacy = redirect.BackendLegacy
)

// Config says what to guard and where to send it.
type Config struct {
	// ListenAddrs are the proxy's listen addresses; TCP to the metadata port is
	// DNATed to the first one of the same family, and each is put on lo if missing.
	ListenAddrs []netip.AddrPort
	// MetadataAddrs are the metadata server's addresses (default 169.254.169.254).
	MetadataAddrs []netip.Addr
	// MetadataPort is the metadata server's port (default 80).
	MetadataPort uint16
	// Backend selects the iptables binaries (default: iptables on PATH).
	Backend Backend
}

// DefaultMetadataAddr is GCE's metadata server address.
var DefaultMetadataAddr = netip.MustParseAddr("169.254.169.254")

func (c Config) normalized() (Config, error) {
	if len(c.ListenAddrs) == 0 {
		return c, errors.New("hostguard: no listen address to redirect to")
	}
	for _, ap := range c.ListenAddrs {
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().IsUnspecified() {
			return c, fmt.Errorf("hostguard: listen address %q: want a specific address and a non-zero port", ap)
		}
	}
	seenFamily := map[bool]bool{}
	for _, ap := range c.ListenAddrs {
		v6 := ap.Addr().Unmap().Is6()
		if seenFamily[v6] {
			continue
		}
		seenFamily[v6] = true
		// The first address of each family is the DNAT target: the kernel drops
		// packets from pods DNATed to loopback (unless route_localnet is set).
		if ap.Addr().Unmap().IsLoopback() {
			return c, fmt.Errorf("hostguard: listen address %s is a loopback address and cannot receive pod traffic redirected by DNAT: list a node-local address (e.g. 169.254.169.252:988) first", ap)
		}
	}
	if len(c.MetadataAddrs) == 0 {
		c.MetadataAddrs = []netip.Addr{DefaultMetadataAddr}
	}
	for _, a := range c.MetadataAddrs {
		if !a.IsValid() || a.IsUnspecified() {
			return c, fmt.Errorf("hostguard: metadata address %q is not a specific address", a)
		}
	}
	if c.MetadataPort == 0 {
		c.MetadataPort = 80
	}
	switch c.Backend {
	case BackendDefault, BackendNFT, BackendLegacy:
	default:
		return c, fmt.Errorf("hostguard: iptables backend %q: want %q, %q or empty", c.Backend, BackendNFT, BackendLegacy)
	}
	return c, nil
}

// family is one IP family's view of the config and its tools.
type family struct {
	v6       bool
	metadata []netip.Addr
	port     uint16
	target   netip.AddrPort // DNAT target; invalid when no listen address of this family
	iptables string         // binary names
	restore  string
}

func families(c Config) []family {
	var fams []family
	for _, v6 := range []bool{false, true} {
		f := family{v6: v6, port: c.MetadataPort}
		for _, a := range c.MetadataAddrs {
			if a.Unmap().Is6() == v6 {
				f.metadata = append(f.metadata, a.Unmap())
			}
		}
		for _, ap := range c.ListenAddrs {
			if ap.Addr().Unmap().Is6() == v6 {
				f.target = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
				break
			}
		}
		base := "iptables"
		if v6 {
			base = "ip6tables"
		}
		if c.Backend != BackendDefault {
			base += "-" + string(c.Backend)
		}
		f.iptables, f.restore = base, base+"-restore"
		fams = append(fams, f)
	}
	return fams
}

// jump is one rule that sends traffic into the guard chain.
type jump struct {
	table, chain string
	spec         []string
}

var jumps = []jump{
	{"nat", "PREROUTING", []string{"-m", "comment", "--comment", ruleComment, "-j", Chain}},
	{"filter", "FORWARD", []string{"-m", "comment", "--comment", ruleComment, "-j", Chain}},
	{"filter", "INPUT", []string{"!", "-i", "lo", "-m", "comment", "--comment", ruleComment, "-j", Chain}},
}

func (f family) ipt() (*iptables.IPTables, error) {
	proto := iptables.ProtocolIPv4
	if f.v6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(f.iptables))
	if err != nil {
		return nil, fmt.Errorf("hostguard: %s: %w", f.iptables, err)
	}
	return ipt, nil
}

// ruleLine renders one iptables-restore line, quoted as redirect renders its own rules.
func ruleLine(op, chain string, spec []string) string {
	return redirect.Rule(append([]string{op, chain}, spec...)).String()
}

// installPayload is the iptables-restore input that (re)writes the guard chains,
// deletes the jumps that are there (stale) and inserts one fresh jump per built-in
// chain at its top: whatever the state before, one transaction per table leaves
// exactly one set of rules, first in line.
func (f family) installPayload(stale map[string][]string) string {
	var b strings.Builder
	comment := []string{"-m", "comment", "--comment", ruleComment}
	b.WriteString("*nat\n:" + Chain + " - [0:0]\n-F " + Chain + "\n")
	if f.target.IsValid() {
		to := f.target.String() // 1.2.3.4:988 or [fd00::1]:988
		for _, a := range f.metadata {
			spec := append([]string{"-d", redirect.HostPrefix(a), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(f.port)}, comment...)
			spec = append(spec, "-j", "DNAT", "--to-destination", to)
			b.WriteString(ruleLine("-A", Chain, spec) + "\n")
		}
	}
	writeJumps(&b, "nat", stale["nat"])
	b.WriteString("COMMIT\n*filter\n:" + Chain + " - [0:0]\n-F " + Chain + "\n")
	icmpReject := "icmp-port-unreachable"
	if f.v6 {
		icmpReject = "icmp6-port-unreachable"
	}
	for _, a := range f.metadata {
		tcp := append([]string{"-d", redirect.HostPrefix(a), "-p", "tcp"}, comment...)
		b.WriteString(ruleLine("-A", Chain, append(tcp, "-j", "REJECT", "--reject-with", "tcp-reset")) + "\n")
		other := append([]string{"-d", redirect.HostPrefix(a)}, comment...)
		b.WriteString(ruleLine("-A", Chain, append(other, "-j", "REJECT", "--reject-with", icmpReject)) + "\n")
	}
	writeJumps(&b, "filter", stale["filter"])
	b.WriteString("COMMIT\n")
	return b.String()
}

func writeJumps(b *strings.Builder, table string, stale []string) {
	for _, l := range stale {
		b.WriteString(l + "\n")
	}
	for _, j := range jumps {
		if j.table == table {
			b.WriteString(ruleLine("-I", j.chain, append([]string{"1"}, j.spec...)) + "\n")
		}
	}
}

// builtins are the built-in chains the guard jumps from, per table.
var builtins = map[string][]string{"nat": {"PREROUTING"}, "filter": {"FORWARD", "INPUT"}}

// existingJumps returns, as iptables-restore "-D" lines, every rule of the table's
// built-in chains that jumps to the guard chain, duplicates and older spellings
// included.
func (f family) existingJumps(ipt *iptables.IPTables, table string) ([]string, error) {
	var lines []string
	for _, builtin := range builtins[table] {
		rules, err := ipt.List(table, builtin)
		if err != nil {
			return nil, fmt.Errorf("hostguard: %s: listing %s %s: %w", f.iptables, table, builtin, err)
		}
		for _, r := range rules {
			// List gives "-A CHAIN spec..." in iptables-save syntax: the same spec
			// after -D deletes exactly that rule.
			if strings.HasSuffix(r, " -j "+Chain) || strings.Contains(r, " -j "+Chain+" ") {
				lines = append(lines, "-D"+strings.TrimPrefix(r, "-A"))
			}
		}
	}
	return lines, nil
}

func runRestore(ctx context.Context, bin, payload string) error {
	cmd := exec.CommandContext(ctx, bin, "--noflush", "--wait")
	cmd.Stdin = strings.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("hostguard: %s --noflush: %w: %s\ninput was:\n%s", bin, err, strings.TrimSpace(stderr.String()), payload)
	}
	return nil
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
	if err := addListenAddrs(cfg, log); err != nil {
		return err
	}
	for _, f := range families(cfg) {
		if len(f.metadata) == 0 {
			continue
		}
		ipt, err := f.ipt()
		if err != nil {
			return err
		}
		stale := map[string][]string{}
		for _, table := range []string{"nat", "filter"} {
			if stale[table], err = f.existingJumps(ipt, table); err != nil {
				return err
			}
		}
		if err := runRestore(ctx, f.restore, f.installPayload(stale)); err != nil {
			return err
		}
		log.Info("host guard installed", "iptables", f.iptables, "metadata", f.metadata,
			"port", cfg.MetadataPort, "redirect_to", f.target.String(), "jumps_replaced", len(stale["nat"])+len(stale["filter"]))
		if !f.target.IsValid() {
			log.Warn("no listen address of this family: metadata traffic of this family is rejected, not redirected", "iptables", f.iptables)
		}
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
		if _, err := exec.LookPath(f.iptables); err != nil && len(f.metadata) == 0 {
			// No address of this family was configured and the node has no tool
			// for it: nothing of ours can be there.
			continue
		}
		if err := f.remove(ctx, log); err != nil {
			if len(f.metadata) == 0 {
				// Not configured for this family, so most likely never installed
				// in it: a node without ip6tables support must still uninstall.
				log.Warn("could not check for a host guard of an unconfigured family", "iptables", f.iptables, "err", err)
				continue
			}
			errs = append(errs, err)
		}
	}
	errs = append(errs, removeListenAddrs(cfg, log))
	return errors.Join(errs...)
}

func (f family) remove(ctx context.Context, log *slog.Logger) error {
	ipt, err := f.ipt()
	if err != nil {
		return err
	}
	var b strings.Builder
	removed := 0
	for _, table := range []string{"nat", "filter"} {
		exists, err := ipt.ChainExists(table, Chain)
		if err != nil {
			return fmt.Errorf("hostguard: %s: looking for chain %s in %s: %w", f.iptables, Chain, table, err)
		}
		lines, err := f.existingJumps(ipt, table)
		if err != nil {
			return err
		}
		if !exists && len(lines) == 0 {
			continue
		}
		b.WriteString("*" + table + "\n")
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
		if exists {
			b.WriteString("-F " + Chain + "\n-X " + Chain + "\n")
		}
		b.WriteString("COMMIT\n")
		removed += len(lines)
	}
	if b.Len() == 0 {
		log.Info("host guard not present", "iptables", f.iptables)
		return nil
	}
	if err := runRestore(ctx, f.restore, b.String()); err != nil {
		return err
	}
	log.Info("host guard removed", "iptables", f.iptables, "jumps_removed", removed)
	return nil
}

func addListenAddrs(cfg Config, log *slog.Logger) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("hostguard: finding lo: %w", err)
	}
	for _, ap := range cfg.ListenAddrs {
		a := ap.Addr().Unmap()
		present, err := addrPresent(a)
		if err != nil {
			return err
		}
		if present {
			continue
		}
		if a.Is6() {
			// IPv6 addresses carry no label, so Remove could not tell ours apart.
			return fmt.Errorf("hostguard: listen address %s is not on this node and the guard adds only IPv4 addresses: put it on lo first", a)
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}, Label: AddrLabel}
		if err := netlink.AddrAdd(lo, addr); err != nil {
			return fmt.Errorf("hostguard: adding listen address %s to lo: %w", a, err)
		}
		log.Info("listen address added to lo", "addr", a.String(), "label", AddrLabel)
	}
	return nil
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
