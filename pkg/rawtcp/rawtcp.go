// Package rawtcp is a minimal IPv4 TCP client over an AF_PACKET socket: what a process
// holding only CAP_NET_RAW in a pod can do. Frames sent that way never pass the
// sending netns's iptables hooks, so the per-pod rules the CNI plugin installs cannot
// see them; only the node can. The host guard's tests play that attacker with it, and
// the datapath self-test (pkg/selftest) sends its probe with it.
//
// The client's kernel knows nothing of the connection, and would answer the server's
// SYN-ACK with a reset. Two ways keep it silent, chosen by the caller:
//   - ClaimSrc: Src is an address no interface of the netns owns; the client answers
//     ARP for it, and the kernel drops (instead of resetting) packets for an address
//     that is not its own. Works where the node reaches Src by ARP on the link (a
//     bridge), not on routed datapaths (ptp, Calico, Cilium), where the node routes
//     only the pod's own /32 to its veth.
//   - otherwise Src is the interface's own address (works on every topology, and passes
//     anti-spoofing), and the caller stops the kernel's resets itself (pkg/selftest
//     drops them with a rule in the pod netns while it runs).
package rawtcp

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Errors of Exchange that say how the connection failed.
var (
	// ErrNoGateway: the next hop never answered ARP; nothing was sent to Dst.
	ErrNoGateway = errors.New("rawtcp: no ARP answer from the next hop")
	// ErrDropped: no SYN-ACK came back before the deadline.
	ErrDropped = errors.New("rawtcp: no SYN-ACK: the connection was dropped")
	// ErrReset: the peer (or something on the path) reset the connection.
	ErrReset = errors.New("rawtcp: connection reset")
	// ErrTimeout: connected, but the answer did not end before the deadline.
	ErrTimeout = errors.New("rawtcp: timed out before the server closed the connection")
)

// Source ports are taken above Linux's default ephemeral range (32768-60999), so a
// probe does not collide with a connection of the pod's own kernel.
const (
	portBase  = 61000
	portRange = 4000
)

// Client is one IPv4 TCP client over an AF_PACKET socket bound to IfName.
type Client struct {
	IfName string
	// Src is the source address; see ClaimSrc.
	Src netip.Addr
	// NextHop is the address whose MAC the frames are sent to: the gateway, or Dst
	// itself when it is on the link.
	NextHop netip.Addr
	Dst     netip.AddrPort
	// ClaimSrc: answer ARP requests for Src (an address the netns does not own).
	ClaimSrc bool
	// Enough, when set, is asked after each piece of the answer: true ends the
	// exchange at once (the connection is reset) with what came so far.
	Enough func(received []byte) bool

	fd     int
	ifi    *net.Interface
	hopMAC net.HardwareAddr
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

// SourcePort returns the port Exchange uses, chosen when it starts (0 before).
func (c *Client) SourcePort() uint16 { return c.sport }

// PickSourcePort chooses the source port now (Exchange keeps a port chosen before
// it), so a caller can prepare for it (e.g. a rule dropping its kernel's resets).
func (c *Client) PickSourcePort() (uint16, error) {
	var rnd [2]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return 0, fmt.Errorf("rawtcp: %w", err)
	}
	c.sport = portBase + binary.BigEndian.Uint16(rnd[:])%portRange
	return c.sport, nil
}

func (c *Client) validate() error {
	switch {
	case c.IfName == "":
		return errors.New("rawtcp: no interface")
	case !c.Src.Is4() || !c.NextHop.Is4() || !c.Dst.Addr().Is4():
		return fmt.Errorf("rawtcp: IPv4 only (src %s, next hop %s, dst %s)", c.Src, c.NextHop, c.Dst)
	}
	return nil
}

func (c *Client) open() error {
	ifi, err := net.InterfaceByName(c.IfName)
	if err != nil {
		return fmt.Errorf("rawtcp: %w", err)
	}
	c.ifi = ifi
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return fmt.Errorf("rawtcp: AF_PACKET socket: %w", err)
	}
	c.fd = fd
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("rawtcp: bind to %s: %w", c.IfName, err)
	}
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return fmt.Errorf("rawtcp: SO_RCVTIMEO: %w", err)
	}
	return nil
}

func (c *Client) send(frame []byte) error {
	if err := unix.Sendto(c.fd, frame, 0, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: c.ifi.Index}); err != nil {
		return fmt.Errorf("rawtcp: send on %s: %w", c.IfName, err)
	}
	return nil
}

// recv returns the next incoming frame, or nil after the socket's short timeout.
// ARP requests for Src are answered on the way when ClaimSrc is set.
func (c *Client) recv() ([]byte, error) {
	buf := make([]byte, 65536)
	for {
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("rawtcp: receive on %s: %w", c.IfName, err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		frame := buf[:n]
		if c.ClaimSrc && len(frame) >= 42 && binary.BigEndian.Uint16(frame[12:]) == etherARP {
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

// answerARP replies to "who has Src?": the node then sends Src's packets here.
func (c *Client) answerARP(f []byte) {
	if binary.BigEndian.Uint16(f[20:]) != 1 {
		return
	}
	tpa := netip.AddrFrom4([4]byte(f[38:42]))
	if tpa != c.Src {
		return
	}
	sha := net.HardwareAddr(bytes.Clone(f[22:28]))
	spa := netip.AddrFrom4([4]byte(f[28:32]))
	_ = c.send(arpFrame(sha, c.ifi.HardwareAddr, 2, c.ifi.HardwareAddr, c.Src, sha, spa)) // best effort; the next request is answered again
}

// resolveNextHop asks for the next hop's MAC, from Src: the request also tells the
// node that Src is here.
func (c *Client) resolveNextHop(deadline time.Time) error {
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	req := arpFrame(bcast, c.ifi.HardwareAddr, 1, c.ifi.HardwareAddr, c.Src, make(net.HardwareAddr, 6), c.NextHop)
	for next := time.Now(); time.Now().Before(deadline); {
		if time.Now().After(next) {
			if err := c.send(req); err != nil {
				return err
			}
			next = time.Now().Add(300 * time.Millisecond)
		}
		f, err := c.recv()
		if err != nil {
			return err
		}
		if len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == etherARP && binary.BigEndian.Uint16(f[20:]) == 2 &&
			netip.AddrFrom4([4]byte(f[28:32])) == c.NextHop {
			c.hopMAC = net.HardwareAddr(bytes.Clone(f[22:28]))
			return nil
		}
	}
	return fmt.Errorf("%w %s on %s", ErrNoGateway, c.NextHop, c.IfName)
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

// segment builds one Ethernet frame carrying a TCP segment from Src to Dst.
func (c *Client) segment(flags byte, payload []byte) []byte {
	const ipLen, tcpLen = 20, 20
	f := make([]byte, 14+ipLen+tcpLen+len(payload))
	copy(f[0:], c.hopMAC)
	copy(f[6:], c.ifi.HardwareAddr)
	binary.BigEndian.PutUint16(f[12:], etherIPv4)
	ip := f[14 : 14+ipLen]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(ipLen+tcpLen+len(payload)))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	s4, d4 := c.Src.As4(), c.Dst.Addr().As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	tcp := f[14+ipLen:]
	binary.BigEndian.PutUint16(tcp[0:], c.sport)
	binary.BigEndian.PutUint16(tcp[2:], c.Dst.Port())
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
func (c *Client) parse(f []byte) (tcpIn, bool) {
	if len(f) < 14+20+20 || binary.BigEndian.Uint16(f[12:]) != etherIPv4 {
		return tcpIn{}, false
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ip[9] != unix.IPPROTO_TCP || total > len(ip) || ihl < 20 || total < ihl+20 {
		return tcpIn{}, false
	}
	if netip.AddrFrom4([4]byte(ip[12:16])) != c.Dst.Addr() || netip.AddrFrom4([4]byte(ip[16:20])) != c.Src {
		return tcpIn{}, false
	}
	tcp := ip[ihl:total]
	if binary.BigEndian.Uint16(tcp[0:]) != c.Dst.Port() || binary.BigEndian.Uint16(tcp[2:]) != c.sport {
		return tcpIn{}, false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return tcpIn{}, false
	}
	return tcpIn{seq: binary.BigEndian.Uint32(tcp[4:]), ack: binary.BigEndian.Uint32(tcp[8:]), flags: tcp[13], payload: tcp[off:]}, true
}

// Exchange connects, sends request and returns what the server sent until it closed
// the connection, Enough said so, or the time ran out (ErrTimeout then, with what came
// so far). It must run on a thread in the netns of IfName.
func (c *Client) Exchange(request []byte, timeout time.Duration) ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	if c.sport == 0 {
		if _, err := c.PickSourcePort(); err != nil {
			return nil, err
		}
	}
	if err := c.open(); err != nil {
		return nil, err
	}
	defer unix.Close(c.fd)
	if err := c.resolveNextHop(deadline); err != nil {
		return nil, err
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("rawtcp: %w", err)
	}
	iss := binary.BigEndian.Uint32(rnd[:])

	// Handshake.
	c.sndNxt = iss
	syn := c.segment(tcpSYN, nil)
	established := false
	for next := time.Now(); !established; {
		if time.Now().After(deadline) {
			return nil, ErrDropped
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
			return nil, fmt.Errorf("%w during the handshake", ErrReset)
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
			_ = c.send(c.segment(tcpRST|tcpACK, nil)) // best effort: the server's own timeout ends it otherwise
			return out, ErrTimeout
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
			return out, ErrReset
		}
		if seg.flags&tcpACK != 0 && seg.ack == c.sndNxt {
			acked = true
		}
		if seg.seq == c.rcvNxt {
			out = append(out, seg.payload...)
			c.rcvNxt += uint32(len(seg.payload))
			if c.Enough != nil && len(seg.payload) > 0 && c.Enough(out) {
				_ = c.send(c.segment(tcpRST|tcpACK, nil)) // best effort: we want no more of it
				return out, nil
			}
			if seg.flags&tcpFIN != 0 {
				c.rcvNxt++
				return out, c.send(c.segment(tcpACK|tcpFIN, nil))
			}
		}
		if len(seg.payload) > 0 || seg.flags&tcpFIN != 0 {
			if err := c.send(c.segment(tcpACK, nil)); err != nil {
				return out, err
			}
		}
	}
}
