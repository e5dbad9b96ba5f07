package simnode

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// Probes of GCE's other node services (NTP, the ALTS handshaker) and of refusals, run
// from inside a netns (a simulated node's pod, or a real pod's netns in the e2e).

// NTPQuery sends one NTP client request to addr from inside the netns at nsPath and
// checks that a server answer to it comes back.
func NTPQuery(nsPath, addr string) error {
	c, err := DialIn(nsPath, "udp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	req := make([]byte, 48)
	req[0] = 4<<3 | 3 // version 4, mode 3 (client)
	binary.BigEndian.PutUint64(req[40:], fakegce.NTPTime(time.Now()))
	if _, err := c.Write(req); err != nil {
		return err
	}
	resp := make([]byte, 64)
	n, err := c.Read(resp)
	if err != nil {
		return err
	}
	if n != 48 || resp[0]&7 != 4 || !bytes.Equal(resp[24:32], req[40:48]) {
		return fmt.Errorf("not an NTP server answer to our request: %x", resp[:n])
	}
	return nil
}

// ALTSExchange makes, from inside the netns at nsPath, the gRPC-shaped call over
// HTTP/2 with prior knowledge that grpc-go's ALTS handshaker client makes, to addr
// (metadata port 8080), and expects the fake handshaker's answer to it.
func ALTSExchange(nsPath, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := fakegce.ALTSHandshakerCall.Do(ctx, DialContextIn(nsPath), addr)
	if err != nil {
		return fmt.Errorf("%s: %w", fakegce.ALTSHandshakerCall.Name, err)
	}
	if got != fakegce.ALTSHandshakerAnswer {
		return fmt.Errorf("%s: answer %q, want %q", fakegce.ALTSHandshakerCall.Name, got, fakegce.ALTSHandshakerAnswer)
	}
	return nil
}

// ALTSHold opens, from inside the netns at nsPath, a connection to addr (metadata port
// 8080) and starts the handshaker call on it without ending it, as a client between
// two handshake messages: it returns once the stand-in's answer headers came back
// (the call was relayed and is held open), or an error when the connection ended
// first. The caller closes the connection.
func ALTSHold(nsPath, addr string) (net.Conn, error) {
	c, err := DialIn(nsPath, "tcp", addr, 3*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fail := func(err error) (net.Conn, error) { c.Close(); return nil, err }
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: fakegce.ALTSHandshakerPath}, {Name: ":authority", Value: "metadata.google.internal:8080"},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"}} {
		if err := enc.WriteField(f); err != nil {
			return fail(err)
		}
	}
	fr := http2.NewFramer(c, c)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		return fail(err)
	}
	if err := fr.WriteSettings(); err != nil {
		return fail(err)
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		return fail(err)
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return fail(fmt.Errorf("before the answer's headers: %w", err))
		}
		if h, ok := f.(*http2.HeadersFrame); ok && h.StreamID == 1 {
			_ = c.SetDeadline(time.Time{})
			return c, nil
		}
	}
}

// ALTSOthersUnanswered sends, from inside the netns at nsPath, each of
// fakegce.ALTSOtherProbes to addr (metadata port 8080) and returns an error for every
// one that got an answer: through a relay that carries only the handshaker service,
// none does.
func ALTSOthersUnanswered(nsPath, addr string) error {
	var errs []error
	for _, p := range fakegce.ALTSOtherProbes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		got, err := p.Do(ctx, DialContextIn(nsPath), addr)
		cancel()
		if err == nil || got != "" {
			errs = append(errs, fmt.Errorf("%s: answered %q (err %v), want no answer", p.Name, got, err))
		}
	}
	return errors.Join(errs...)
}

// DialRefused connects to addr over network (tcp or udp; for udp a datagram is sent
// and an answer awaited) from inside the netns at nsPath and reports how long until it
// failed: err is nil only when it was refused. A locally rejected datagram fails its
// send with EPERM; an ICMP error or a reset shows as connection refused or reset.
func DialRefused(nsPath, network, addr string) (time.Duration, error) {
	start := time.Now()
	c, got := DialIn(nsPath, network, addr, 3*time.Second)
	if got == nil {
		if network == "udp" {
			_ = c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, got = c.Write([]byte("probe")); got == nil {
				_, got = c.Read(make([]byte, 16))
			}
		}
		c.Close()
	}
	took := time.Since(start)
	if errors.Is(got, syscall.ECONNREFUSED) || errors.Is(got, syscall.ECONNRESET) || errors.Is(got, syscall.EPERM) {
		return took, nil
	}
	return took, fmt.Errorf("%s to %s: %v, want it refused", network, addr, got)
}
