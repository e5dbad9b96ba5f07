package xtables

import (
	"fmt"
	"slices"
	"strings"
)

// Snapshot is the parsed output of iptables-save for one address family: which chains
// exist in which table and the rules of each, in the text form restore accepts back.
type Snapshot struct {
	tables map[string]*tableSnapshot
}

type tableSnapshot struct {
	chains map[string]bool
	// rules are "-A" lines without the "-A ", i.e. "CHAIN args...", in order.
	rules []string
}

// ParseSave parses iptables-save output. Comment lines (including the nft backend's
// "legacy tables present" warning) are ignored.
func ParseSave(out string) (Snapshot, error) {
	s := Snapshot{tables: map[string]*tableSnapshot{}}
	var cur *tableSnapshot
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			cur = &tableSnapshot{chains: map[string]bool{}}
			s.tables[line[1:]] = cur
		case line == "COMMIT":
			cur = nil
		case cur == nil:
			return Snapshot{}, fmt.Errorf("xtables: iptables-save line %d outside a table: %q", n+1, line)
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			cur.chains[name] = true
		case strings.HasPrefix(line, "-A "):
			cur.rules = append(cur.rules, line[len("-A "):])
		default:
			return Snapshot{}, fmt.Errorf("xtables: unexpected iptables-save line %d: %q", n+1, line)
		}
	}
	return s, nil
}

// HasChain reports whether table holds chain.
func (s Snapshot) HasChain(table, chain string) bool {
	t := s.tables[table]
	return t != nil && t.chains[chain]
}

// Jumps returns the rules of table, in any chain, that jump or go to chain, in the
// "CHAIN args..." form that "-D " turns into a delete command.
func (s Snapshot) Jumps(table, chain string) []string {
	t := s.tables[table]
	if t == nil {
		return nil
	}
	var out []string
	for _, r := range t.rules {
		if JumpsTo(r, chain) {
			out = append(out, r)
		}
	}
	return out
}

// JumpsTo reports whether rule, in the form iptables-save and go-iptables' List print
// ("-A CHAIN args..." or "CHAIN args..."), jumps or goes to chain: -j or -g, last or
// followed by target options.
func JumpsTo(rule, chain string) bool {
	for _, op := range []string{" -j ", " -g "} {
		if strings.HasSuffix(rule, op+chain) || strings.Contains(rule, op+chain+" ") {
			return true
		}
	}
	return false
}

// ChainRules returns the rules of chain in table, without the leading "CHAIN ".
func (s Snapshot) ChainRules(table, chain string) []string {
	t := s.tables[table]
	if t == nil {
		return nil
	}
	var out []string
	for _, r := range t.rules {
		if rest, ok := strings.CutPrefix(r, chain+" "); ok {
			out = append(out, rest)
		}
	}
	return out
}

// TablesWith returns, sorted, the tables that hold chain or a jump to it.
func (s Snapshot) TablesWith(chain string) []string {
	var out []string
	for name := range s.tables {
		if s.HasChain(name, chain) || len(s.Jumps(name, chain)) > 0 {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// Chains returns, sorted and without duplicates, every chain of any table whose name
// starts with prefix (redirect.ChainPrefix finds every per-pod chain).
func (s Snapshot) Chains(prefix string) []string {
	var out []string
	for _, t := range s.tables {
		for c := range t.chains {
			if strings.HasPrefix(c, prefix) {
				out = append(out, c)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
