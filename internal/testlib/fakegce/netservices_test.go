package fakegce

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func startServices(t *testing.T) (dnsAddr, ntpAddr, altsAddr string) {
	t.Helper()
	var s Services
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := net.Listen("tcp", udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	s.ServeDNS(udp, tcp, []netip.Addr{netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("fd20:ce::254")})
	ntp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.ServeNTP(ntp)
	alts, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.ServeALTS(alts)
	return udp.LocalAddr().String(), ntp.LocalAddr().String(), alts.Addr().String()
}

func TestDNS(t *testing.T) {
	t.Parallel()
	addr, _, _ := startServices(t)
	for _, net := range []string{"udp", "tcp"} {
		for _, tc := range []struct {
			name  string
			qtype uint16
			rcode int
			want  string
		}{
			{"metadata.google.internal.", dns.TypeA, dns.RcodeSuccess, "169.254.169.254"},
			{"METADATA.google.internal.", dns.TypeA, dns.RcodeSuccess, "169.254.169.254"},
			{"metadata.", dns.TypeA, dns.RcodeSuccess, "169.254.169.254"},
			{"metadata.google.internal.", dns.TypeAAAA, dns.RcodeSuccess, "fd20:ce::254"},
			{TestName + ".", dns.TypeA, dns.RcodeSuccess, TestNameAddr.String()},
			{TestName + ".", dns.TypeAAAA, dns.RcodeSuccess, ""},
			{"kube-env.metadata.google.internal.", dns.TypeA, dns.RcodeNameError, ""},
		} {
			m := new(dns.Msg)
			m.SetQuestion(tc.name, tc.qtype)
			c := &dns.Client{Net: net, Timeout: 2 * time.Second}
			r, _, err := c.Exchange(m, addr)
			if err != nil {
				t.Fatalf("%s %s: %v", net, tc.name, err)
			}
			got := ""
			for _, rr := range r.Answer {
				switch v := rr.(type) {
				case *dns.A:
					got = v.A.String()
				case *dns.AAAA:
					got = v.AAAA.String()
				}
			}
			if r.Rcode != tc.rcode || got != tc.want || len(r.Answer) > 1 {
				t.Errorf("%s %s %s: rcode %d answer %q (%d records), want %d %q", net, tc.name, dns.TypeToString[tc.qtype], r.Rcode, got, len(r.Answer), tc.rcode, tc.want)
			}
		}
	}
}

func TestNTP(t *testing.T) {
	t.Parallel()
	_, addr, _ := startServices(t)
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := make([]byte, 48)
	req[0] = 4<<3 | 3 // version 4, client
	sent := NTPTime(time.Now())
	binary.BigEndian.PutUint64(req[40:], sent)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	resp := make([]byte, 100)
	n, err := c.Read(resp)
	if err != nil {
		t.Fatal(err)
	}
	if n != 48 || resp[0]&7 != 4 || resp[0]>>3&7 != 4 || resp[1] != 1 || string(resp[12:16]) != "GOOG" {
		t.Fatalf("answer %x: want 48 bytes, mode 4, version 4, stratum 1, refid GOOG", resp[:n])
	}
	if origin := binary.BigEndian.Uint64(resp[24:32]); origin != sent {
		t.Errorf("origin %x, want the client's transmit time %x", origin, sent)
	}
	secs := int64(binary.BigEndian.Uint64(resp[40:48])>>32) - ntpEpochOffset
	if d := time.Since(time.Unix(secs, 0)); d < -2*time.Second || d > 2*time.Second {
		t.Errorf("transmit time %v off by %v", time.Unix(secs, 0), d)
	}
	if _, ok := NTPAnswer(append([]byte{4<<3 | 4}, make([]byte, 47)...), time.Now()); ok {
		t.Error("a server packet (mode 4) was answered")
	}
}

func TestALTSStandIn(t *testing.T) {
	t.Parallel()
	_, _, addr := startServices(t)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != ALTSGreeting+"hello" {
		t.Errorf("read %q, %v; want the greeting and the echo", got, err)
	}
}
