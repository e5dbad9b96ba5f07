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
// someone removed (check.go compares an iptables-save with the desired state).
//
// Files: hostguard.go Install and Remove; config.go Config and its derivation from
// Settings; rules.go the chains and jumps per address family, rendered for
// iptables-restore; attest.go, spoof.go, limit.go, generation.go the parts above.
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
