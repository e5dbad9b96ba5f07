// Package xtables is metaconceal's one vocabulary for the iptables programs: which
// backend (auto, nft, legacy) and address family, which programs that means and where
// they are, how a rule is written the way iptables-save prints it (quoting included),
// how iptables-save output is read back, and how iptables-restore is run (one process
// per transaction, xtables lock wait included). The CNI plugin's per-pod rules
// (pkg/redirect), the host guard (pkg/hostguard), the node readiness gate and the
// configuration (pkg/netconf, the proxy's and the installer's --iptables-backend) all
// use these names, so a backend or a family means the same thing everywhere.
//
// github.com/coreos/go-iptables stays the library for queries (List, Exists,
// ChainExists); Runner.IPTables builds its handle for the same programs.
//
// Nothing here enters a network namespace: the processes run in the calling thread's.
package xtables

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// Backend names which iptables implementation runs: BackendAuto (what PATH resolves
// the plain names to, i.e. what the node's alternatives select), BackendNFT or
// BackendLegacy.
type Backend string

const (
	// BackendAuto runs iptables, iptables-restore and iptables-save as found on PATH
	// (then in the usual sbin directories): on Debian-like nodes, what
	// update-alternatives, and so the node, uses.
	BackendAuto Backend = "auto"
	// BackendNFT runs the iptables-nft programs (nf_tables).
	BackendNFT Backend = "nft"
	// BackendLegacy runs the iptables-legacy programs, for nodes whose other rules
	// (kube-proxy, the CNI) are legacy ones.
	BackendLegacy Backend = "legacy"
)

// Backends are the known backends, BackendAuto (the default everywhere) first.
var Backends = []Backend{BackendAuto, BackendNFT, BackendLegacy}

// BackendChoices lists the accepted values for messages: `"auto", "nft" or "legacy"`.
const BackendChoices = `"auto", "nft" or "legacy"`

// ParseBackend reads a backend name as configured (a flag, a conflist key). The empty
// string is BackendAuto: it was the host guard's and the installer's default before
// "auto" was accepted there, and stays a synonym for compatibility.
func ParseBackend(s string) (Backend, error) {
	if s == "" {
		return BackendAuto, nil
	}
	b := Backend(s)
	if err := b.Validate(); err != nil {
		return "", err
	}
	return b, nil
}

// Validate reports a backend that is none of Backends. The empty Backend is accepted
// as BackendAuto.
func (b Backend) Validate() error {
	switch b {
	case "", BackendAuto, BackendNFT, BackendLegacy:
		return nil
	}
	return fmt.Errorf("unknown iptables backend %q: want %s", string(b), BackendChoices)
}

// Family is an IP address family.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Families are both families, IPv4 first.
var Families = []Family{IPv4, IPv6}

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf returns the family of a (an IPv4-mapped IPv6 address is IPv4).
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// Protocol is f as go-iptables names it.
func (f Family) Protocol() iptables.Protocol {
	if f == IPv6 {
		return iptables.ProtocolIPv6
	}
	return iptables.ProtocolIPv4
}

// RejectWith is the ICMP answer a REJECT of family f sends: port unreachable, which
// a TCP connect reports as "connection refused" and a UDP socket as a refused send.
func RejectWith(f Family) string {
	if f == IPv6 {
		return "icmp6-port-unreachable"
	}
	return "icmp-port-unreachable"
}

// HostPrefix renders an address as iptables-save prints a source or destination:
// a /32 or a /128.
func HostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// Tables the project writes to, in the order restore inputs list them.
const (
	TableRaw    = "raw"
	TableNAT    = "nat"
	TableFilter = "filter"
)

// Rule is one rule's arguments after "-A CHAIN", one argument per element.
type Rule []string

// String renders a rule the way iptables-save does, so that rendered text compares
// line by line with what the kernel holds. Only a comment can hold characters that
// need quoting (iptables-save quotes a comment unless it is made of letters, digits,
// '_' and '-'; the project's comments hold spaces), so an argument is quoted exactly
// when it is empty or holds a space, a tab, a quote or a backslash.
func (r Rule) String() string {
	parts := make([]string, len(r))
	for i, arg := range r {
		parts[i] = Quote(arg)
	}
	return strings.Join(parts, " ")
}

// Line renders one iptables-restore command line: op ("-A", "-I", "-D") and chain
// followed by the rule's arguments (for "-I", the position is the rule's first one).
func Line(op, chain string, r Rule) string {
	return Rule(append([]string{op, chain}, r...)).String()
}

// Quote quotes one argument as iptables-save and iptables-restore read it (see
// Rule.String).
func Quote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}
