package hostguard

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// ChainLimit is the filter chain that limits, per source IP, the rate of new TCP
// connections to the proxy's and the ALTS relay's listen addresses. INPUT jumps to it
// for TCP SYNs that do not arrive on lo (node-originated traffic to a local address
// always uses lo, so the node and hostNetwork pods are never limited).
//
// Why in the kernel: a pod that re-dials as fast as it can costs the proxy an accept,
// a pod lookup and a reset per connection in user space (the flood bench measured
// 264,664 such connections in 8 s, 89% of a core, before this chain). A SYN over the
// limit is dropped before any socket exists: the flooding pod's connect waits for its
// own SYN retransmission (1 s, then 2 s, ...), a back-off the pod cannot skip, and the
// proxy never sees it.
//
// Why DROP rather than a reset: a reset invites an immediate re-dial, so a flood would
// still cost the node a packet round per attempt; a dropped SYN costs one hash lookup.
const ChainLimit = "METACONCEAL-GUARD-LIMIT"

// Defaults of the per-source new-connection limit (metaconceal-proxy's
// --guard-conn-rate and --guard-conn-burst). They equal the proxy's per-pod request
// limits (--pod-rate 100, --pod-burst 200): every connection carries at least one
// request, so a pod inside its request limits, even one that opens a new connection
// per request, is never held back by the guard. A pod's start-up burst (about 100
// requests within a second) fits the burst twice over.
const (
	DefaultConnRate  = 100
	DefaultConnBurst = 200
)

// Bounds the hashlimit match accepts (iptables refuses a rate above 1,000,000/s).
const (
	maxConnRate  = 1_000_000
	maxConnBurst = 10_000
)

// validateConnLimit checks the limit's settings (0 rate = off).
func validateConnLimit(rate, burst uint32) error {
	if rate == 0 {
		return nil
	}
	if rate > maxConnRate {
		return fmt.Errorf("hostguard: connection rate %d per second per source: at most %d", rate, maxConnRate)
	}
	if burst == 0 || burst > maxConnBurst {
		return fmt.Errorf("hostguard: connection burst %d: want 1-%d when a connection rate is set", burst, maxConnBurst)
	}
	return nil
}

// limitTargets are the listen addresses of the family (the proxy's, then the relay's),
// each once.
func limitTargets(c Config, v6 bool) []netip.AddrPort {
	var out []netip.AddrPort
	for _, ap := range slices.Concat(c.ListenAddrs, c.ALTSListenAddrs) {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if ap.Addr().Is6() == v6 && !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out
}

// limitJump is the INPUT rule that sends new TCP connections from outside the node
// through ChainLimit.
var limitJump = []string{"!", "-i", "lo", "-p", "tcp", "-m", "tcp", "--syn", "-m", "comment", "--comment", ruleComment, "-j", ChainLimit}

// hashlimitName names the kernel's hash table of one target (at most 15 characters;
// the namespace's tables of one family share one name space).
func hashlimitName(i int, ap netip.AddrPort) string {
	return fmt.Sprintf("mcguard%d-%d", i, ap.Port())
}

// limitRules renders ChainLimit's rules for the family: one per target, dropping a
// source's SYNs above the rate once its burst is spent.
func (f family) limitRules() []string {
	var rules []string
	for i, t := range f.limitTargets {
		spec := []string{"-d", xtables.HostPrefix(t.Addr()), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(t.Port()),
			"-m", "hashlimit", "--hashlimit-above", fmt.Sprintf("%d/sec", f.connRate), "--hashlimit-burst", fmt.Sprint(f.connBurst),
			"--hashlimit-mode", "srcip", "--hashlimit-name", hashlimitName(i, t),
			"-m", "comment", "--comment", ruleComment, "-j", "DROP"}
		rules = append(rules, xtables.Line("-A", ChainLimit, spec))
	}
	return rules
}

// limitOn says whether the family gets ChainLimit.
func (f family) limitOn() bool { return f.connRate > 0 && len(f.limitTargets) > 0 }

// writeLimitChain declares, flushes and fills ChainLimit (filter table) when the limit
// is on.
func (f family) writeLimitChain(b *strings.Builder) {
	if !f.limitOn() {
		return
	}
	b.WriteString(":" + ChainLimit + " - [0:0]\n-F " + ChainLimit + "\n")
	for _, r := range f.limitRules() {
		b.WriteString(r + "\n")
	}
}

// writeLimitTail comes after the stale jumps are deleted: the jump into ChainLimit
// when the limit is on, or the deletion of a chain left by an earlier install when it
// is off.
func (f family) writeLimitTail(b *strings.Builder) {
	switch {
	case f.limitOn():
		b.WriteString(xtables.Line("-I", "INPUT", append([]string{"1"}, limitJump...)) + "\n")
	case f.limitExists:
		b.WriteString("-F " + ChainLimit + "\n-X " + ChainLimit + "\n")
	}
}
