package hostguard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// directPodFlow matches the conntrack entries of TCP connections that a pod (a source
// address that is not one of this node's) opened to a metadata address on the
// metadata or ALTS port and that reached it directly: their reply comes from that
// address and port, not from a proxy they were redirected to.
type directPodFlow struct {
	metadata map[netip.Addr]bool
	ports    map[uint16]bool
	local    map[netip.Addr]bool
}

func ipOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (m directPodFlow) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	fwd, rev := f.Forward, f.Reverse
	dst := ipOf(fwd.DstIP)
	switch {
	case fwd.Protocol != unix.IPPROTO_TCP, !m.metadata[dst], !m.ports[fwd.DstPort]:
		return false
	case m.local[ipOf(fwd.SrcIP)]:
		return false // node-originated: the node keeps full access
	case ipOf(rev.SrcIP) != dst || rev.SrcPort != fwd.DstPort:
		return false // redirected to a proxy already
	}
	return true
}

// dumpAttempts bounds the conntrack dumps per family when the table keeps changing.
const dumpAttempts = 5

// localAddrs returns every address of every interface of the current netns.
func localAddrs() (map[netip.Addr]bool, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("hostguard: listing the node's addresses: %w", err)
	}
	local := map[netip.Addr]bool{}
	for _, a := range addrs {
		local[ipOf(a.IP)] = true
	}
	return local, nil
}

// deleteDirectPodConnections deletes the conntrack entries of pod connections to the
// metadata addresses on the metadata and ALTS ports that reached the server directly,
// and returns how many it deleted.
func deleteDirectPodConnections(cfg Config) (uint, error) {
	local, err := localAddrs()
	if err != nil {
		return 0, err
	}
	var total uint
	for _, f := range families(cfg) {
		if len(f.metadata) == 0 {
			continue
		}
		m := directPodFlow{metadata: map[netip.Addr]bool{}, ports: map[uint16]bool{f.port: true, f.altsPort: true}, local: local}
		for _, a := range f.metadata {
			m.metadata[a] = true
		}
		fam := netlink.InetFamily(unix.AF_INET)
		if f.v6 {
			fam = netlink.InetFamily(unix.AF_INET6)
		}
		// A dump that the table changed under (a busy node) is reported as
		// interrupted after deleting what it saw: dump again, a few times.
		var err error
		for attempt := 0; attempt < dumpAttempts; attempt++ {
			var n uint
			n, err = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam, m)
			total += n
			if !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		if err != nil {
			return total, fmt.Errorf("hostguard: deleting conntrack entries of pod connections to %v: %w", f.metadata, err)
		}
	}
	return total, nil
}
