package hostguard

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Attested identity (issue 17). A source IP is not an identity: a pod with CAP_NET_RAW
// sends from any address, and on a bridge it answers ARP for free ones. So the guard
// lets the kernel say, when a connection is set up, which attachment it came from:
//
//   - nat PREROUTING -> AttestChain (ahead of the guard's own DNAT): for every recorded
//     attachment, one rule per IP and host interface: `-s IP` arriving on the
//     attachment's host interface (`-i hostIf` for a routed veth, `-m physdev
//     --physdev-in hostIf` for a bridge port) jumps to AttestPodChain, or, for an
//     exposed attachment, to AttestExposedChain;
//   - those two chains DNAT TCP to the proxy (its listen addresses, and the metadata
//     addresses' port, which an exposed pod without rules of its own reaches) to the
//     proxy's attested port (AttestPorts.Proxy) or exposed port (AttestPorts.Exposed),
//     and TCP to the relay (its listen addresses, the metadata addresses' ALTS port)
//     to the relay's attested port (AttestPorts.ALTS), on the same node-local address;
//   - filter INPUT -> SpoofChain drops TCP to those ports that no DNAT of ours sent
//     there (`-m conntrack ! --ctstate DNAT`), so a pod cannot dial them directly.
//
// Everything else that reaches the proxy's and the relay's own ports is unattributed:
// served as concealed, in one budget shared by every unattributed source. The proxy
// names the pod of an attested connection from its source address, which the rule
// vouched for; whether it is exposed is the port it arrived on, decided by the kernel at
// the SYN (NAT is decided on a connection's first packet only). NAT needs no
// sysctl and no socket option.

// Attest chains in the nat table.
const (
	AttestChain        = "METACONCEAL-ATTEST"
	AttestPodChain     = "METACONCEAL-ATTEST-POD"
	AttestExposedChain = "METACONCEAL-ATTEST-EXPOSED"
)

// attestComment tags the attestation rules.
const attestComment = "metaconceal attest"

// AttestPorts are the ports of the attested listeners, on the address the guard
// DNATs to (the first listen address of each family, the proxy's or the relay's).
type AttestPorts struct {
	Proxy   uint16 // attested, concealed pods
	Exposed uint16 // attested, exposed pods (mode EXPOSED, excluded namespaces)
	ALTS    uint16 // attested ALTS relay connections
}

// DefaultAttestPorts are below 1024, so that no unprivileged process of the node can
// bind them first, and next to GKE's 987 and 988.
var DefaultAttestPorts = AttestPorts{Proxy: 984, Exposed: 985, ALTS: 986}

func (p AttestPorts) normalized(c Config) (AttestPorts, error) {
	if p == (AttestPorts{}) {
		p = DefaultAttestPorts
	}
	ports := []uint16{p.Proxy, p.Exposed, p.ALTS}
	for i, x := range ports {
		if x == 0 {
			return p, fmt.Errorf("hostguard: attested ports %v: every port must be set", p)
		}
		if slices.Contains(ports[:i], x) {
			return p, fmt.Errorf("hostguard: attested ports %v: must differ", p)
		}
		for _, ap := range slices.Concat(c.ListenAddrs, c.ALTSListenAddrs) {
			if ap.Port() == x {
				return p, fmt.Errorf("hostguard: attested port %d is also the listen address %s", x, ap)
			}
		}
	}
	return p, nil
}

// AttestedListener is one listener the proxy opens beside its listen addresses.
type AttestedListener struct {
	Addr    netip.AddrPort
	Ingress podindex.Ingress
	Relay   bool // the ALTS relay's; else the proxy's
}

// AttestedListeners are the listeners the guard sends attested connections to: per
// family, the proxy's attested and exposed ports on its first listen address, and the
// relay's attested port on its first listen address. The proxy opens them all.
func (c Config) AttestedListeners() ([]AttestedListener, error) {
	c, err := c.normalized()
	if err != nil {
		return nil, err
	}
	var out []AttestedListener
	for _, f := range families(c) {
		if f.target.IsValid() {
			out = append(out,
				AttestedListener{Addr: netip.AddrPortFrom(f.target.Addr(), c.Attest.Proxy), Ingress: podindex.Attested},
				AttestedListener{Addr: netip.AddrPortFrom(f.target.Addr(), c.Attest.Exposed), Ingress: podindex.Exposed})
		}
		if f.altsTarget.IsValid() {
			out = append(out, AttestedListener{Addr: netip.AddrPortFrom(f.altsTarget.Addr(), c.Attest.ALTS), Ingress: podindex.Attested, Relay: true})
		}
	}
	return out, nil
}

// attestTargets are the family's attested listen addresses, for the connection limit.
func attestTargets(c Config, v6 bool) []netip.AddrPort {
	var out []netip.AddrPort
	if t := firstOf(c.ListenAddrs, v6); t.IsValid() {
		out = append(out, netip.AddrPortFrom(t.Addr(), c.Attest.Proxy), netip.AddrPortFrom(t.Addr(), c.Attest.Exposed))
	}
	if t := firstOf(c.ALTSListenAddrs, v6); t.IsValid() {
		out = append(out, netip.AddrPortFrom(t.Addr(), c.Attest.ALTS))
	}
	return out
}

// attestDNATs are the rules of AttestPodChain (exposed false) or AttestExposedChain.
func (f spoofFamily) attestDNATs(chain string, exposed bool) []string {
	var rules []string
	add := func(dst netip.Addr, port uint16, to netip.AddrPort) {
		spec := []string{"-d", xtables.HostPrefix(dst), "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(port),
			"-m", "comment", "--comment", attestComment, "-j", "DNAT", "--to-destination", to.String()}
		rules = append(rules, xtables.Line("-A", chain, spec))
	}
	if f.target.IsValid() {
		to := netip.AddrPortFrom(f.target.Addr(), f.ports.Proxy)
		if exposed {
			to = netip.AddrPortFrom(f.target.Addr(), f.ports.Exposed)
		}
		for _, a := range f.metadata {
			add(a, f.port, to)
		}
		for _, ap := range f.listen {
			add(ap.Addr(), ap.Port(), to)
		}
	}
	if f.altsTarget.IsValid() {
		to := netip.AddrPortFrom(f.altsTarget.Addr(), f.ports.ALTS)
		if f.altsPort != f.port {
			for _, a := range f.metadata {
				add(a, f.altsPort, to)
			}
		}
		for _, ap := range f.altsListen {
			add(ap.Addr(), ap.Port(), to)
		}
	}
	return rules
}

// spoofRules are SpoofChain's rules: TCP to an attested port that no DNAT sent there
// is dropped.
func (f spoofFamily) spoofRules() []string {
	var rules []string
	drop := func(dst netip.Addr, ports ...uint16) {
		ps := make([]string, len(ports))
		for i, p := range ports {
			ps[i] = fmt.Sprint(p)
		}
		spec := []string{"-d", xtables.HostPrefix(dst), "-p", "tcp", "-m", "multiport", "--dports", strings.Join(ps, ","),
			"-m", "conntrack", "!", "--ctstate", "DNAT", "-m", "comment", "--comment", spoofComment, "-j", "DROP"}
		rules = append(rules, xtables.Line("-A", SpoofChain, spec))
	}
	switch {
	case f.target.IsValid() && f.altsTarget.IsValid() && f.target.Addr() == f.altsTarget.Addr():
		drop(f.target.Addr(), f.ports.Proxy, f.ports.Exposed, f.ports.ALTS)
	default:
		if f.target.IsValid() {
			drop(f.target.Addr(), f.ports.Proxy, f.ports.Exposed)
		}
		if f.altsTarget.IsValid() {
			drop(f.altsTarget.Addr(), f.ports.ALTS)
		}
	}
	return rules
}

// attestRules renders AttestChain's rules for the records: one rule per (IP of this
// family, resolvable host interface). Concealed attachments come first, so that an IP
// two records claim on one interface (a stale record) is never taken as exposed.
// It returns, per record key, what kept some of its IPs from being attested.
func attestRules(v6 bool, recs []state.Record, resolve func(v6 bool, names []string) ([]ingress, []string)) (rules []string, attested int, problems map[string][]string) {
	recs = slices.Clone(recs)
	slices.SortStableFunc(recs, func(a, b state.Record) int {
		if a.Exposed != b.Exposed {
			if a.Exposed {
				return 1
			}
			return -1
		}
		return strings.Compare(a.Key(), b.Key())
	})
	problems = map[string][]string{}
	for _, rec := range recs {
		var ips []netip.Addr
		for _, s := range rec.IPs {
			ip, ok := state.ParseIP(s)
			if ok && ip.Is6() == v6 {
				ips = append(ips, ip)
			}
		}
		if len(ips) == 0 {
			continue
		}
		if rec.HostIf == "" {
			problems[rec.Key()] = append(problems[rec.Key()], "the record names no host interface")
			continue
		}
		ins, probs := resolve(v6, []string{rec.HostIf})
		problems[rec.Key()] = append(problems[rec.Key()], probs...)
		if len(problems[rec.Key()]) == 0 {
			delete(problems, rec.Key())
		}
		target := AttestPodChain
		if rec.Exposed {
			target = AttestExposedChain
		}
		for _, ip := range ips {
			for _, in := range ins {
				match := []string{"-i", in.name}
				if in.bridgePort {
					match = []string{"-m", "physdev", "--physdev-in", in.name}
				}
				spec := slices.Concat([]string{"-s", xtables.HostPrefix(ip)}, match,
					[]string{"-m", "comment", "--comment", attestComment, "-j", target})
				rules = append(rules, xtables.Line("-A", AttestChain, spec))
				attested++
			}
		}
	}
	return rules, attested, problems
}

// attestJump is the nat PREROUTING rule into AttestChain; it comes before the guard's.
var attestJump = hook(xtables.TableNAT, "PREROUTING", xtables.Rule{"-p", "tcp", "-m", "comment", "--comment", attestComment, "-j", AttestChain})
