package rawtcp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
)

func TestChecksum(t *testing.T) {
	t.Parallel()
	// RFC 1071's example words, and an IPv4 header whose checksum is known.
	hdr := []byte{0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7}
	cases := []struct {
		name  string
		parts [][]byte
		want  uint16
	}{
		{"ipv4 header", [][]byte{hdr}, 0xb861},
		{"odd length pads with zero", [][]byte{{0x01}}, ^uint16(0x0100)},
		{"split parts", [][]byte{hdr[:10], hdr[10:]}, 0xb861},
	}
	for _, c := range cases {
		if got := checksum(c.parts...); got != c.want {
			t.Errorf("%s: checksum %#04x, want %#04x", c.name, got, c.want)
		}
	}
}

// TestSegmentParse: a segment the client builds, turned around as the server's
// answer would come, is recognised as the connection's; another port's is not.
func TestSegmentParse(t *testing.T) {
	t.Parallel()
	c := &Client{
		Src: netip.MustParseAddr("10.0.0.2"), Dst: netip.MustParseAddrPort("169.254.169.254:80"),
		ifi:    &net.Interface{HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 2}},
		hopMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, sport: 61234, sndNxt: 1000, rcvNxt: 5000,
	}
	f := c.segment(tcpACK|tcpPSH, []byte("GET / HTTP/1.1\r\n\r\n"))
	ip := f[14:34]
	if checksum(ip) != 0 {
		t.Error("IPv4 header checksum does not verify")
	}
	tcp := f[34:]
	pseudo := make([]byte, 12)
	copy(pseudo[0:], ip[12:20])
	pseudo[9] = 6
	binary.BigEndian.PutUint16(pseudo[10:], uint16(len(tcp)))
	if checksum(pseudo, tcp) != 0 {
		t.Error("TCP checksum does not verify")
	}
	// The answer: addresses and ports swapped.
	answer := func(sport uint16) []byte {
		a := append([]byte(nil), f...)
		copy(a[14+12:], ip[16:20])
		copy(a[14+16:], ip[12:16])
		binary.BigEndian.PutUint16(a[34:], 80)
		binary.BigEndian.PutUint16(a[36:], sport)
		return a
	}
	for _, cse := range []struct {
		name  string
		frame []byte
		ok    bool
	}{
		{"ours", answer(61234), true},
		{"another port", answer(61235), false},
		{"our own outgoing segment", f, false},
		{"too short", f[:40], false},
	} {
		seg, ok := c.parse(cse.frame)
		if ok != cse.ok {
			t.Errorf("%s: parse ok %v, want %v", cse.name, ok, cse.ok)
		}
		if ok && (string(seg.payload) != "GET / HTTP/1.1\r\n\r\n" || seg.seq != 1000 || seg.flags != tcpACK|tcpPSH) {
			t.Errorf("%s: segment %+v", cse.name, seg)
		}
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	v4 := netip.MustParseAddr("10.0.0.2")
	dst := netip.MustParseAddrPort("169.254.169.254:80")
	for _, c := range []struct {
		name string
		c    Client
		ok   bool
	}{
		{"ok", Client{IfName: "eth0", Src: v4, NextHop: v4, Dst: dst}, true},
		{"no interface", Client{Src: v4, NextHop: v4, Dst: dst}, false},
		{"ipv6", Client{IfName: "eth0", Src: netip.MustParseAddr("fd00::2"), NextHop: v4, Dst: dst}, false},
		{"no next hop", Client{IfName: "eth0", Src: v4, Dst: dst}, false},
	} {
		if err := c.c.validate(); (err == nil) != c.ok {
			t.Errorf("%s: validate %v", c.name, err)
		}
	}
}
