package hostguard

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

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

// limitTargets are the listen addresses of the family (the proxy's, the relay's, then
// the attested ones), each once.
func limitTargets(c Config, v6 bool) []netip.AddrPort {
	var out []netip.AddrPort
	for _, ap := range slices.Concat(c.ListenAddrs, c.ALTSListenAddrs, attestTargets(c, v6)) {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if ap.Addr().Is6() == v6 && !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out
}

// limitJump is the INPUT rule that sends new TCP connections from outside the node
// through ChainLimit. "--syn" is spelled as iptables-save prints it.
var limitJump = hook(xtables.TableFilter, "INPUT", xtables.Rule{"!", "-i", "lo", "-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN",
	"-m", "comment", "--comment", ruleComment, "-j", ChainLimit})

// ChainSource is the raw-table chain that drops, before anything else sees them, TCP
// SYNs to the metadata addresses and to the listen addresses whose source address the
// node would not route back through the interface they came in on (`-m rpfilter`,
// strict, whatever the node's rp_filter sysctls say). It is there with ChainLimit,
// whose per-source hash table it protects: a pod that forges source addresses (raw
// sockets, in the default capability set) cannot fill that table with addresses that
// are not routed to it, so a legitimate pod's first SYN is not dropped for want of a
// free entry (xt_hashlimit drops the packet of a new source when its table is full).
// What it cannot stop: addresses routed through the same interface (a bridge's subnet,
// or a loose route), which the table's bound must hold (LimitTableMax).
const ChainSource = "METACONCEAL-GUARD-SRC"

// sourceJump sends new TCP connections that come from outside the node (not lo)
// through ChainSource, in raw PREROUTING: before conntrack, the guard's DNAT and the
// limit.
var sourceJump = hook(xtables.TableRaw, "PREROUTING", xtables.Rule{"!", "-i", "lo", "-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN",
	"-m", "comment", "--comment", ruleComment, "-j", ChainSource})

// sourceRules renders ChainSource's rules: for each metadata address (before the
// guard's DNAT) and each listen address (a pod's own DNAT already applied), a SYN from
// a source that fails the reverse-path check is dropped.
func (f family) sourceRules() []string {
	var rules []string
	rpf := append([]string{"-m", "rpfilter", "--invert"}, guardComment...)
	ports := fmt.Sprint(f.port)
	if f.altsPort != f.port {
		ports += fmt.Sprintf(",%d", f.altsPort)
	}
	for _, a := range f.metadata {
		spec := slices.Concat([]string{"-d", xtables.HostPrefix(a), "-p", "tcp", "-m", "multiport", "--dports", ports}, rpf, []string{"-j", "DROP"})
		rules = append(rules, xtables.Line("-A", ChainSource, spec))
	}
	for _, t := range f.limitTargets {
		spec := slices.Concat([]string{"-d", xtables.HostPrefix(t.Addr()), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(t.Port())}, rpf, []string{"-j", "DROP"})
		rules = append(rules, xtables.Line("-A", ChainSource, spec))
	}
	return rules
}

// Bounds of the limit's hash tables (one per listen address and family), explicit so
// that they no longer depend on the node's memory (the kernel sizes an unbounded table
// from it: up to 8,192 buckets and 65,536 entries, far less on a small node). A node
// runs at most a few hundred pods (GKE: 256), one source each per family, so the
// table has room for 256 times that, in at most about 8 MB (kernel memory, allocated
// as sources appear). When it is full the kernel drops the SYN of every source that
// has no entry until entries expire: the state ChainSource keeps forged sources from
// causing. Sources routed through a pod's interface (its bridge's subnet, a loose
// route, IPv6 prefixes) still pass ChainSource; to fill the table with those a pod
// must send LimitTableMax distinct sources within LimitTableExpire, 65,536 SYNs a
// second, and keep doing so.
const (
	// LimitTableSize is --hashlimit-htable-size: hash buckets per table.
	LimitTableSize = 8192
	// LimitTableMax is --hashlimit-htable-max: entries (sources) per table.
	LimitTableMax = 65536
	// LimitTableExpire is --hashlimit-htable-expire: how long a source's entry
	// outlives its last SYN. A second, the unit of the rate: iptables passes exactly
	// that to the kernel when the option is absent from a per-second rule, and
	// iptables-save leaves the option out when it has that value, so the rules are
	// written without it to read back as written (the reconciliation compares them).
	// An idle second loses a source at most half its burst (burst 200 refills in 2 s
	// at 100/s), and entries of sources that stopped leave the table within a second.
	LimitTableExpire = time.Second
)

// hashlimitName names the kernel's hash table of one target (at most 15 characters;
// the namespace's tables of one family share one name space). "mcgb" (bounded): a table
// keeps the settings it was created with for as long as a rule names it, so the bounded
// tables need names of their own to replace the unbounded "mcguard<i>-<port>" of
// earlier releases on an upgraded node.
func hashlimitName(i int, ap netip.AddrPort) string {
	return fmt.Sprintf("mcgb%d-%d", i, ap.Port())
}

// limitRules renders ChainLimit's rules for the family: one per target, dropping a
// source's SYNs above the rate once its burst is spent.
func (f family) limitRules() []string {
	var rules []string
	for i, t := range f.limitTargets {
		spec := []string{"-d", xtables.HostPrefix(t.Addr()), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(t.Port()),
			"-m", "hashlimit", "--hashlimit-above", fmt.Sprintf("%d/sec", savedRate(f.connRate)), "--hashlimit-burst", fmt.Sprint(f.connBurst),
			"--hashlimit-mode", "srcip", "--hashlimit-name", hashlimitName(i, t),
			"--hashlimit-htable-size", fmt.Sprint(LimitTableSize), "--hashlimit-htable-max", fmt.Sprint(LimitTableMax), // expiry: LimitTableExpire
			"-m", "comment", "--comment", ruleComment, "-j", "DROP"}
		rules = append(rules, xtables.Line("-A", ChainLimit, spec))
	}
	return rules
}

// savedRate is the per-second rate iptables-save prints for a hashlimit rule given
// rate: iptables turns it into a whole number of microseconds between packets
// (1,000,000 / rate) and prints it back as 1,000,000 / that, so 3000 becomes 3003. The
// kernel enforces the printed rate; the guard writes it so that its rules read back as
// written (the reconciliation compares them).
func savedRate(rate uint32) uint32 {
	if rate == 0 {
		return 0
	}
	return 1_000_000 / (1_000_000 / rate)
}

// limitOn says whether the family gets ChainLimit (and ChainSource).
func (f family) limitOn() bool { return f.connRate > 0 && len(f.limitTargets) > 0 }

// cleanup is what Install adds to table's block after the stale jumps are deleted:
// the deletion of a limit chain left by an earlier install when the limit is now off.
func (f family) cleanup(table string) string {
	if f.limitOn() {
		return ""
	}
	switch {
	case table == xtables.TableFilter && f.limitExists:
		return "-F " + ChainLimit + "\n-X " + ChainLimit + "\n"
	case table == xtables.TableRaw && f.sourceExists:
		return "-F " + ChainSource + "\n-X " + ChainSource + "\n"
	}
	return ""
}
