package simnode

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

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

// ALTSExchange connects to addr (metadata port 8080) from inside the netns at nsPath
// and expects the fake ALTS handshaker's greeting, then the echo of what it sends
// after a half-close: the path passed bytes and the half-close both ways.
func ALTSExchange(nsPath, addr string) error {
	c, err := DialIn(nsPath, "tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	greeting := make([]byte, len(fakegce.ALTSGreeting))
	if _, err := io.ReadFull(c, greeting); err != nil || string(greeting) != fakegce.ALTSGreeting {
		return fmt.Errorf("greeting %q, %v", greeting, err)
	}
	if _, err := c.Write([]byte("client hello")); err != nil {
		return err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != "client hello" {
		return fmt.Errorf("echo after half-close %q, %v", rest, err)
	}
	return nil
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
