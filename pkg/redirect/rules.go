// Package redirect renders, applies, checks and removes the iptables rules that
// conceal the metadata server from one CNI attachment (container id + interface).
//
// Each attachment gets a chain of its own in the nat and filter tables of the pod
// netns, jumped to from OUTPUT:
//
//	nat    OUTPUT -> METACONCEAL-<hash>: DNAT tcp <metadata>:80   -> proxy
//	                                     DNAT tcp <metadata>:8080 -> ALTS relay (alts: relay)
//	filter OUTPUT -> METACONCEAL-<hash>: RETURN udp+tcp <metadata>:53 and udp <metadata>:123
//	                                     REJECT everything else to <metadata>
//
// DNS and NTP pass untouched (on GCE the metadata address is also the VPC resolver
// and the NTP server). DNATed packets reach filter OUTPUT with the proxy as
// destination, so the REJECT only catches what was neither passed nor redirected. Rules are written in the exact form iptables-save
// prints them (both nf_tables and legacy backends print the same form), so that the
// rendered text can be compared line by line with what the kernel holds.
//
// The iptables vocabulary (backends, families, programs, quoting, iptables-save
// parsing, the restore runner) is pkg/xtables's, shared with the host guard; this
// package adds what is specific to one attachment's rules.
//
// Nothing here enters a network namespace: callers run these functions inside the pod
// netns (ns.WithNetNSPath); the iptables processes inherit the calling thread's netns.
package redirect

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// ChainPrefix starts the name of every chain this package creates.
const ChainPrefix = "METACONCEAL-"

// Attachment is what CNI calls an attachment: a container's interface.
type Attachment struct {
	ContainerID string
	IfName      string
}

func (a Attachment) String() string { return a.ContainerID + "/" + a.IfName }

// Chain returns the attachment's chain name: the prefix and 12 hex digits of a hash
// of the attachment, 24 characters, under iptables' 28-character limit.
func (a Attachment) Chain() string {
	// NUL cannot occur in either part, so distinct attachments never hash the same input.
	sum := sha256.Sum256([]byte(a.ContainerID + "\x00" + a.IfName))
	return ChainPrefix + hex.EncodeToString(sum[:6])
}

// comment names the attachment on the jump rule, so that iptables-save tells an
// operator whose chain it is. Only characters iptables never escapes are kept.
func (a Attachment) comment() string {
	keep := func(s string) string {
		return strings.Map(func(r rune) rune {
			switch {
			case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-', r == ':':
				return r
			}
			return '_'
		}, s)
	}
	c := "metaconceal " + keep(a.ContainerID) + " " + keep(a.IfName)
	const maxComment = 255 // xt_comment holds 256 bytes including the NUL
	if len(c) > maxComment {
		c = c[:maxComment]
	}
	return c
}

// Spec is everything one attachment gets in one address family.
type Spec struct {
	Family     xtables.Family
	Attachment Attachment
	// Metadata are the metadata addresses of this family.
	Metadata []netip.Addr
	// Proxy receives TCP to Metadata port 80. When it is not valid, port 80 is
	// rejected.
	Proxy netip.AddrPort
	// ALTS receives TCP to Metadata port 8080 (the ALTS handshaker's port). When it
	// is not valid, port 8080 is rejected.
	ALTS netip.AddrPort
}

// Validate reports a spec that cannot be rendered.
func (s Spec) Validate() error {
	if s.Family != xtables.IPv4 && s.Family != xtables.IPv6 {
		return fmt.Errorf("redirect: unknown address family %d", s.Family)
	}
	if s.Attachment.ContainerID == "" || s.Attachment.IfName == "" {
		return fmt.Errorf("redirect: attachment %q lacks a container id or interface name", s.Attachment)
	}
	if len(s.Metadata) == 0 {
		return fmt.Errorf("redirect: no %s metadata address", s.Family)
	}
	for _, a := range s.Metadata {
		if a.Is4() != (s.Family == xtables.IPv4) {
			return fmt.Errorf("redirect: metadata address %s is not %s", a, s.Family)
		}
	}
	if s.Proxy.IsValid() && s.Proxy.Addr().Is4() != (s.Family == xtables.IPv4) {
		return fmt.Errorf("redirect: proxy %s is not %s", s.Proxy, s.Family)
	}
	if s.ALTS.IsValid() && s.ALTS.Addr().Is4() != (s.Family == xtables.IPv4) {
		return fmt.Errorf("redirect: ALTS relay %s is not %s", s.ALTS, s.Family)
	}
	return nil
}

// TableRules are the attachment's rules in one table: the jump from OUTPUT and the
// rules of its own chain.
type TableRules struct {
	Table string
	Jump  xtables.Rule
	Chain []xtables.Rule
}

// Render returns the rules of spec, table by table. A table with nothing to do (nat
// when neither the proxy nor the ALTS relay is set for the family) is left out.
func Render(s Spec) ([]TableRules, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	chain := s.Attachment.Chain()
	jump := xtables.Rule{"-m", "comment", "--comment", s.Attachment.comment(), "-j", chain}
	var out []TableRules
	if s.Proxy.IsValid() || s.ALTS.IsValid() {
		nat := TableRules{Table: xtables.TableNAT, Jump: jump}
		for _, a := range s.Metadata {
			nat.Chain = append(nat.Chain, DNATRules(a, s.Proxy, s.ALTS)...)
		}
		out = append(out, nat)
	}
	filter := TableRules{Table: xtables.TableFilter, Jump: jump}
	for _, a := range s.Metadata {
		filter.Chain = append(filter.Chain, PassRules(a)...)
		filter.Chain = append(filter.Chain, xtables.Rule{"-d", xtables.HostPrefix(a), "-j", "REJECT", "--reject-with", xtables.RejectWith(s.Family)})
	}
	return append(out, filter), nil
}

// PassRules are the filter rules that let DNS (UDP and TCP 53) and NTP (UDP 123) to
// metadata address a through untouched (RETURN: the rest of OUTPUT still applies).
func PassRules(a netip.Addr) []xtables.Rule {
	out := make([]xtables.Rule, 0, len(gce.PassPorts))
	for _, p := range gce.PassPorts {
		out = append(out, xtables.Rule{"-d", xtables.HostPrefix(a), "-p", p.Proto, "-m", p.Proto, "--dport", fmt.Sprint(p.Port), "-j", "RETURN"})
	}
	return out
}

// DNATRules are the nat rules that send TCP to metadata address a on port 80 to proxy
// and on port 8080 to alts; an invalid target leaves its port alone (the filter table
// rejects it).
func DNATRules(a netip.Addr, proxy, alts netip.AddrPort) []xtables.Rule {
	var out []xtables.Rule
	for _, d := range []struct {
		port uint16
		to   netip.AddrPort
	}{{gce.MetadataPort, proxy}, {gce.ALTSPort, alts}} {
		if d.to.IsValid() {
			out = append(out, xtables.Rule{"-d", xtables.HostPrefix(a), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(d.port),
				"-j", "DNAT", "--to-destination", d.to.String()})
		}
	}
	return out
}

// AddRestore renders an iptables-restore --noflush input that creates the chains with
// -N: it fails as a whole (changing nothing) when a chain already exists, which makes
// it the one-process fast path for an attachment that has no rules yet.
func AddRestore(tables []TableRules, chain string) string {
	var b strings.Builder
	for _, t := range tables {
		fmt.Fprintf(&b, "*%s\n-N %s\n-I OUTPUT 1 %s\n", t.Table, chain, t.Jump)
		for _, r := range t.Chain {
			fmt.Fprintf(&b, "-A %s %s\n", chain, r)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// ReconcileRestore renders an iptables-restore --noflush input that brings the tables
// from what current holds to exactly tables: the chain is declared (created, or flushed
// when it exists) and refilled, every existing jump to it is removed and one inserted,
// and in tables where the attachment should have nothing, its chain is removed.
func ReconcileRestore(tables []TableRules, chain string, current xtables.Snapshot) string {
	var b strings.Builder
	want := map[string]bool{}
	for _, t := range tables {
		want[t.Table] = true
		fmt.Fprintf(&b, "*%s\n:%s - [0:0]\n", t.Table, chain)
		for _, j := range current.Jumps(t.Table, chain) {
			fmt.Fprintf(&b, "-D %s\n", j)
		}
		fmt.Fprintf(&b, "-I OUTPUT 1 %s\n", t.Jump)
		for _, r := range t.Chain {
			fmt.Fprintf(&b, "-A %s %s\n", chain, r)
		}
		b.WriteString("COMMIT\n")
	}
	for _, table := range current.TablesWith(chain) {
		if !want[table] {
			writeRemoval(&b, table, chain, current)
		}
	}
	return b.String()
}

// DeleteRestore renders an iptables-restore --noflush input that removes what
// AddRestore created. It fails as a whole when any of it is missing; callers then fall
// back to RemovalRestore on a fresh snapshot.
func DeleteRestore(tables []TableRules, chain string) string {
	var b strings.Builder
	for _, t := range tables {
		fmt.Fprintf(&b, "*%s\n-D OUTPUT %s\n-F %s\n-X %s\nCOMMIT\n", t.Table, t.Jump, chain, chain)
	}
	return b.String()
}

// RemovalRestore renders an iptables-restore --noflush input that removes every jump
// to chain and chain itself from every table of current; "" when there is nothing.
func RemovalRestore(chain string, current xtables.Snapshot) string {
	var b strings.Builder
	for _, table := range current.TablesWith(chain) {
		writeRemoval(&b, table, chain, current)
	}
	return b.String()
}

func writeRemoval(b *strings.Builder, table, chain string, current xtables.Snapshot) {
	fmt.Fprintf(b, "*%s\n", table)
	for _, j := range current.Jumps(table, chain) {
		fmt.Fprintf(b, "-D %s\n", j)
	}
	if current.HasChain(table, chain) {
		fmt.Fprintf(b, "-F %s\n-X %s\n", chain, chain)
	}
	b.WriteString("COMMIT\n")
}
