package fakegce

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
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

// The stand-in answers the handshaker call with its greeting, anything else (another
// path, HTTP/1.1, a request that is not a gRPC call) with the other marker, and
// records every request.
func TestALTSStandIn(t *testing.T) {
	t.Parallel()
	var s Services
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.ServeALTS(ln)
	var d net.Dialer
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if got, err := ALTSHandshakerCall.Do(ctx, d.DialContext, ln.Addr().String()); err != nil || got != ALTSHandshakerAnswer {
		t.Errorf("handshaker call: %q, %v; want %q", got, err, ALTSHandshakerAnswer)
	}
	for _, p := range ALTSOtherProbes {
		if got, err := p.Do(ctx, d.DialContext, ln.Addr().String()); err != nil || !strings.HasPrefix(got, ALTSOtherMarker) {
			t.Errorf("%s: %q, %v; want the other marker", p.Name, got, err)
		}
	}
	seen := s.ALTSRequests()
	if len(seen) != 1+len(ALTSOtherProbes) {
		t.Fatalf("recorded %d requests, want %d: %v", len(seen), 1+len(ALTSOtherProbes), seen)
	}
	if r := seen[0]; r.Proto != "HTTP/2.0" || r.Method != "POST" || r.Path != ALTSHandshakerPath || r.ContentType != "application/grpc" {
		t.Errorf("first request recorded as %v", r)
	}
	for i, p := range ALTSOtherProbes {
		wantProto := "HTTP/2.0"
		if p.HTTP1 {
			wantProto = "HTTP/1.1"
		}
		if r := seen[1+i]; r.Proto != wantProto || r.Path != p.Path {
			t.Errorf("%s recorded as %v", p.Name, r)
		}
	}
}
