// Command gceprobe asks, from the network namespace it runs in, one of the questions the
// demo's table shows about GCE's other services on the metadata address, and prints a
// one-line answer: DNS over UDP or TCP (Go's own resolver, nameserver 169.254.169.254),
// NTP (one client request), or the ALTS port 8080 (the fake handshaker's greeting).
// The demo runs it with `ip netns exec` inside the namespaces it created: never run it
// in the machine's own network namespace.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/gce"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gceprobe dns-udp|dns-tcp NAME | ntp | alts")
		os.Exit(2)
	}
	answer, err := probe(os.Args[1], os.Args[2:])
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	fmt.Println(answer)
}

func at(port uint16) string {
	return net.JoinHostPort(gce.MetadataIPv4.String(), strconv.Itoa(int(port)))
}

func probe(what string, args []string) (string, error) {
	switch what {
	case "dns-udp", "dns-tcp":
		if len(args) != 1 {
			return "", fmt.Errorf("%s needs a name", what)
		}
		network := strings.TrimPrefix(what, "dns-")
		r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, at(gce.DNSPort))
		}}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		addrs, err := r.LookupNetIP(ctx, "ip4", args[0])
		if err != nil {
			return "", err
		}
		parts := make([]string, len(addrs))
		for i, a := range addrs {
			parts[i] = a.String()
		}
		return fmt.Sprintf("%s A %s", args[0], strings.Join(parts, ",")), nil
	case "ntp":
		c, err := net.DialTimeout("udp", at(gce.NTPPort), 2*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		req := make([]byte, 48)
		req[0] = 4<<3 | 3 // version 4, client
		binary.BigEndian.PutUint64(req[40:], fakegce.NTPTime(time.Now()))
		if _, err := c.Write(req); err != nil {
			return "", err
		}
		resp := make([]byte, 64)
		n, err := c.Read(resp)
		if err != nil {
			return "", err
		}
		if n != 48 || resp[0]&7 != 4 || !bytes.Equal(resp[24:32], req[40:48]) {
			return "", fmt.Errorf("not an NTP answer")
		}
		return fmt.Sprintf("stratum %d, ref %s", resp[1], resp[12:16]), nil
	case "alts":
		c, err := net.DialTimeout("tcp", at(gce.ALTSPort), 2*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		greeting := make([]byte, len(fakegce.ALTSGreeting))
		if _, err := io.ReadFull(c, greeting); err != nil {
			return "", err
		}
		return strings.TrimSpace(string(greeting)), nil
	}
	return "", fmt.Errorf("unknown probe %q", what)
}
