// Package redirect renders, applies, checks and removes the iptables rules that
// conceal the metadata server from one CNI attachment (container id + interface).
//
// Each attachment gets a chain of its own in the nat and filter tables of the pod
// netns, jumped to from OUTPUT:
//
//	nat    OUTPUT -> METACONCEAL-<hash>: DNAT tcp <metadata>:80 -> proxy
//	filter OUTPUT -> METACONCEAL-<hash>: REJECT everything else to <metadata>
//
// DNATed packets reach filter OUTPUT with the proxy as destination, so the REJECT only
// catches what was not redirected. Rules are written in the exact form iptables-save
// prints them (both nf_tables and legacy backends print the same form), so that the
// rendered text can be compared line by line with what the kernel holds.
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
)

// Family is an IP address family.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// ChainPrefix starts the name of every chain this package creates.
const ChainPrefix = "METACONCEAL-"

// Tables this package writes to, in the order restore files list them.
const (
	TableNAT    = "nat"
	TableFilter = "filter"
)

// metadataPort is the port of the metadata server that is redirected.
const metadataPort = 80

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
	Family     Family
	Attachment Attachment
	// Metadata are the metadata addresses of this family.
	Metadata []netip.Addr
	// Proxy receives TCP to Metadata port 80. When it is not valid, nothing is
	// redirected and all traffic to Metadata is rejected.
	Proxy netip.AddrPort
}

// Validate reports a spec that cannot be rendered.
func (s Spec) Validate() error {
	if s.Family != IPv4 && s.Family != IPv6 {
		return fmt.Errorf("redirect: unknown address family %d", s.Family)
	}
	if s.Attachment.ContainerID == "" || s.Attachment.IfName == "" {
		return fmt.Errorf("redirect: attachment %q lacks a container id or interface name", s.Attachment)
	}
	if len(s.Metadata) == 0 {
		return fmt.Errorf("redirect: no %s metadata address", s.Family)
	}
	for _, a := range s.Metadata {
		if a.Is4() != (s.Family == IPv4) {
			return fmt.Errorf("redirect: metadata address %s is not %s", a, s.Family)
		}
	}
	if s.Proxy.IsValid() && s.Proxy.Addr().Is4() != (s.Family == IPv4) {
		return fmt.Errorf("redirect: proxy %s is not %s", s.Proxy, s.Family)
	}
	return nil
}

// Rule is one rule's arguments after "-A CHAIN", one argument per element.
type Rule []string

// String renders a rule the way iptables-save does. Only the comment can hold
// characters that need quoting (iptables-save quotes a comment unless it is made of
// letters, digits, '_' and '-'; ours always holds spaces), so an argument is quoted
// exactly when it is empty or holds a space, a quote or a backslash.
func (r Rule) String() string {
	parts := make([]string, len(r))
	for i, arg := range r {
		parts[i] = quoteArg(arg)
	}
	return strings.Join(parts, " ")
}

func quoteArg(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// TableRules are the attachment's rules in one table: the jump from OUTPUT and the
// rules of its own chain.
type TableRules struct {
	Table string
	Jump  Rule
	Chain []Rule
}

// Render returns the rules of spec, table by table. A table with nothing to do (nat
// when there is no proxy for the family) is left out.
func Render(s Spec) ([]TableRules, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	chain := s.Attachment.Chain()
	jump := Rule{"-m", "comment", "--comment", s.Attachment.comment(), "-j", chain}
	var out []TableRules
	if s.Proxy.IsValid() {
		nat := TableRules{Table: TableNAT, Jump: jump}
		for _, a := range s.Metadata {
			nat.Chain = append(nat.Chain, Rule{"-d", HostPrefix(a), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(metadataPort),
				"-j", "DNAT", "--to-destination", s.Proxy.String()})
		}
		out = append(out, nat)
	}
	rejectWith := "icmp-port-unreachable"
	if s.Family == IPv6 {
		rejectWith = "icmp6-port-unreachable"
	}
	filter := TableRules{Table: TableFilter, Jump: jump}
	for _, a := range s.Metadata {
		filter.Chain = append(filter.Chain, Rule{"-d", HostPrefix(a), "-j", "REJECT", "--reject-with", rejectWith})
	}
	return append(out, filter), nil
}

// HostPrefix renders an address as iptables-save prints a destination: a /32 or /128.
func HostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
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
func ReconcileRestore(tables []TableRules, chain string, current Snapshot) string {
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
func RemovalRestore(chain string, current Snapshot) string {
	var b strings.Builder
	for _, table := range current.TablesWith(chain) {
		writeRemoval(&b, table, chain, current)
	}
	return b.String()
}

func writeRemoval(b *strings.Builder, table, chain string, current Snapshot) {
	fmt.Fprintf(b, "*%s\n", table)
	for _, j := range current.Jumps(table, chain) {
		fmt.Fprintf(b, "-D %s\n", j)
	}
	if current.HasChain(table, chain) {
		fmt.Fprintf(b, "-F %s\n-X %s\n", chain, chain)
	}
	b.WriteString("COMMIT\n")
}
