package hostguard

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// onesSum adds b to a ones' complement sum (RFC 1071).
func onesSum(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func foldSum(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// forgedSYN writes into pkt (40 bytes) an IPv4 packet carrying a TCP SYN from src:sport
// to dst. The kernel fills in the IP header's checksum (IP_HDRINCL); the TCP checksum
// is computed here, so that the node's TCP takes it for a real connection attempt.
func forgedSYN(pkt []byte, src netip.Addr, sport uint16, dst netip.AddrPort, seq uint32) {
	s4, d4 := src.As4(), dst.Addr().As4()
	ip := pkt[:20]
	clear(pkt)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 40)
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	tcp := pkt[20:40]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12] = 5 << 4
	tcp[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	pseudo := append(append(append([]byte{}, s4[:]...), d4[:]...), 0, unix.IPPROTO_TCP, 0, 20)
	binary.BigEndian.PutUint16(tcp[16:], foldSum(onesSum(onesSum(0, pseudo), tcp)))
}

// synFlood sends, from a raw socket in the netns at path (what a pod with CAP_NET_RAW
// can do), one TCP SYN to dst from each of n distinct forged sources first, first+1,
// ..., and returns how long it took.
func synFlood(path string, first netip.Addr, n int, dst netip.AddrPort) (time.Duration, error) {
	var fd int
	err := simnode.In(path, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW) // implies IP_HDRINCL
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("raw socket: %w", err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Addr: dst.Addr().As4()}
	pkt := make([]byte, 40)
	start := time.Now()
	src := first
	for i := range n {
		forgedSYN(pkt, src, uint16(20000+i%40000), dst, uint32(i)*7919)
		for {
			err := unix.Sendto(fd, pkt, 0, sa)
			if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EAGAIN) {
				time.Sleep(time.Millisecond)
				continue
			}
			if err != nil {
				return time.Since(start), fmt.Errorf("sending forged SYN #%d: %w", i+1, err)
			}
			break
		}
		src = src.Next()
	}
	return time.Since(start), nil
}

// floodSources is more than the kernel's default hashlimit table holds on a machine
// with more than 1 GB of memory (8,192 buckets, 65,536 entries) and far more than the
// guard's bound (LimitTableMax).
const floodSources = 80_000

// TestForgedSYNFloodKeepsLegitimatePod: in a simulated node whose reverse-path
// filtering is off (rp_filter 0, as where it is loose), a pod with a raw socket sends
// SYNs to the metadata address from 80,000 distinct forged sources, outside its own
// subnet; afterwards another pod, which never connected before (so it needs a fresh
// entry in the limit's hash table), connects to the proxy through the metadata address
// at once (within 900 ms, less than a SYN retransmission). With the guard's limit
// (reverse-path check in raw PREROUTING before the hashlimit, bounded table) it does,
// on both backends. The control installs the previous release's limit (the same
// hashlimit, no reverse-path check) with a table the flood surely fills: the kernel
// then drops the new pod's SYN.
func TestForgedSYNFloodKeepsLegitimatePod(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "sysctl", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for i, tc := range []struct {
		name     string
		backend  xtables.Backend
		iptables string
		control  bool
	}{
		{"default", xtables.BackendAuto, "iptables", false},
		{"legacy", xtables.BackendLegacy, "iptables-legacy", false},
		{"control: previous release's limit, a table the flood fills", xtables.BackendAuto, "iptables", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Not parallel: each floods the kernel with 80,000 packets.
			ctx := context.Background()
			node := newNode(t)
			for _, k := range []string{"all", "default"} {
				if _, err := node.Exec(ctx, "sysctl", "-qw", "net.ipv4.conf."+k+".rp_filter=0"); err != nil {
					t.Fatal(err)
				}
			}
			_, attacker, err := node.AddRoutedPod("mc-hg-fl", fmt.Sprintf("mcfa%d", i), "10.249.1.1/24", "10.249.1.2/24")
			if err != nil {
				t.Fatal(err)
			}
			_, legit, err := node.AddRoutedPod("mc-hg-fl", fmt.Sprintf("mcfl%d", i), "10.249.2.1/24", "10.249.2.2/24")
			if err != nil {
				t.Fatal(err)
			}
			acceptAndClose(t, node, "169.254.169.252:988")
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ConnRate: DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: tc.backend}
			if tc.control {
				cfg.ConnRate, cfg.ConnBurst = 0, 0
			}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatal(err)
			}
			if tc.control {
				// The limit as the previous release installed it (no reverse-path
				// check before it), with a table this machine's flood fills for sure:
				// the kernel's default one (65,536 entries that expire after a
				// second) needs 65,536 forged SYNs a second, which one raw socket
				// reaches here only when the machine is quiet.
				if _, err := node.Exec(ctx, tc.iptables, "-I", "INPUT", "1", "!", "-i", "lo", "-d", "169.254.169.252/32", "-p", "tcp", "--syn", "--dport", "988",
					"-m", "hashlimit", "--hashlimit-above", "100/sec", "--hashlimit-burst", "200", "--hashlimit-mode", "srcip", "--hashlimit-name", "mcguard0-988",
					"--hashlimit-htable-max", "8192", "--hashlimit-htable-expire", "10000", "-j", "DROP"); err != nil {
					t.Fatal(err)
				}
			}
			took, err := synFlood(attacker, netip.MustParseAddr("10.128.0.1"), floodSources, netip.MustParseAddrPort("169.254.169.254:80"))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d forged SYNs sent in %s", floodSources, took.Round(time.Millisecond))
			c, err := simnode.DialIn(legit, "tcp", "169.254.169.254:80", 900*time.Millisecond)
			if c != nil {
				c.Close()
			}
			switch {
			case tc.control && err == nil:
				t.Errorf("control: the new pod connected after the flood; want its SYN dropped by the full table (the test could not fail)")
			case !tc.control && err != nil:
				t.Errorf("after a flood of SYNs from %d forged sources, a new pod could not connect: %v", floodSources, err)
			}
		})
	}
}
