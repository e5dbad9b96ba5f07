package fakegce

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"

	"github.com/metaconceal/metaconceal/pkg/gce"
)

// What else GCE serves on the metadata address, faithfully enough for a proxy, a CNI
// plugin and a host guard to be tested against: the VPC's DNS resolver (UDP and TCP
// 53), the VM's NTP server (UDP 123) and, on TCP 8080, the ALTS handshaker (a
// gRPC-shaped h2c stand-in, alts.go).

// TestName is a name the fake resolver answers with TestNameAddr: a pod that resolves
// it went through the fake resolver and nowhere else.
const TestName = "dns-probe.metaconceal.test"

// TestNameAddr is TestName's A record.
var TestNameAddr = netip.MustParseAddr("192.0.2.53")

// DNSHandler resolves, for A and AAAA questions, metadata.google.internal and
// metadata to the metadata addresses, TestName to TestNameAddr, and answers NXDOMAIN
// for every other name (NOERROR with no answer for a known name of the other family).
func DNSHandler(metadata []netip.Addr) dns.Handler {
	names := map[string][]netip.Addr{
		dns.Fqdn(gce.MetadataHostname): metadata,
		"metadata.":                    metadata,
		dns.Fqdn(TestName):             {TestNameAddr},
	}
	return dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		m.RecursionAvailable = true
		if len(req.Question) != 1 {
			m.Rcode = dns.RcodeFormatError
			_ = w.WriteMsg(m)
			return
		}
		q := req.Question[0]
		addrs, known := names[strings.ToLower(q.Name)]
		if !known {
			m.Rcode = dns.RcodeNameError
		}
		for _, a := range addrs {
			hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: 60}
			switch {
			case q.Qtype == dns.TypeA && a.Is4():
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: a.AsSlice()})
			case q.Qtype == dns.TypeAAAA && a.Is6():
				hdr.Rrtype = dns.TypeAAAA
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
			}
		}
		_ = w.WriteMsg(m)
	})
}

// Services are the non-HTTP services of one fake node. Close stops them all.
type Services struct {
	// ALTSLog, if set, logs every request the ALTS stand-in serves.
	ALTSLog *slog.Logger

	mu       sync.Mutex
	closers  []func() error
	wg       sync.WaitGroup
	altsSeen []ALTSRequest
}

// ServeDNS answers DNS on pc (UDP) and ln (TCP); either may be nil.
func (s *Services) ServeDNS(pc net.PacketConn, ln net.Listener, metadata []netip.Addr) {
	h := DNSHandler(metadata)
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		if srv.PacketConn == nil && srv.Listener == nil {
			continue
		}
		// Wait until it runs: Shutdown of a server not started yet fails and leaves it running.
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		s.start(srv.ActivateAndServe, srv.Shutdown)
		<-started
	}
}

// ServeNTP answers NTP client requests (mode 3) on pc with a minimal server answer:
// stratum 1, reference "GOOG", the client's transmit time as origin, and now as
// receive and transmit times.
func (s *Services) ServeNTP(pc net.PacketConn) {
	s.start(func() error {
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return err
			}
			if resp, ok := NTPAnswer(buf[:n], time.Now()); ok {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}, pc.Close)
}

// ntpEpochOffset is the seconds from 1900-01-01 (NTP's era 0) to 1970-01-01.
const ntpEpochOffset = 2208988800

// NTPTime renders t as a 64-bit NTP timestamp.
func NTPTime(t time.Time) uint64 {
	secs := uint64(t.Unix() + ntpEpochOffset)
	frac := uint64(t.Nanosecond()) << 32 / 1e9
	return secs<<32 | frac
}

// NTPAnswer is the server's answer to req, a client packet (48 bytes or more, mode
// 3); ok is false for anything else, which a server ignores.
func NTPAnswer(req []byte, now time.Time) (resp []byte, ok bool) {
	if len(req) < 48 || req[0]&0x7 != 3 {
		return nil, false
	}
	version := req[0] >> 3 & 0x7
	resp = make([]byte, 48)
	resp[0] = version<<3 | 4 // leap indicator 0, client's version, mode 4 (server)
	resp[1] = 1              // stratum 1
	resp[2] = req[2]         // poll
	resp[3] = 0xEC           // precision 2^-20
	copy(resp[12:16], "GOOG")
	ts := NTPTime(now)
	binary.BigEndian.PutUint64(resp[16:24], ts)           // reference
	copy(resp[24:32], req[40:48])                         // origin = client's transmit
	binary.BigEndian.PutUint64(resp[32:40], ts)           // receive
	binary.BigEndian.PutUint64(resp[40:48], NTPTime(now)) // transmit
	return resp, true
}

func (s *Services) start(serve func() error, stop func() error) {
	s.mu.Lock()
	s.closers = append(s.closers, stop)
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = serve() // returns when stop closes its socket
	}()
}

// Close stops every service and waits for them.
func (s *Services) Close() error {
	s.mu.Lock()
	closers := s.closers
	s.closers = nil
	s.mu.Unlock()
	var errs []error
	for _, c := range closers {
		if err := c(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	s.wg.Wait()
	if len(errs) > 0 {
		return fmt.Errorf("fakegce: stopping services: %w", errors.Join(errs...))
	}
	return nil
}
