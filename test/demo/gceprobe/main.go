// Command gceprobe asks, from the network namespace it runs in, one of the questions the
// demo's table shows about GCE's other services on the metadata address, and prints a
// one-line answer: DNS over UDP or TCP (Go's own resolver, nameserver 169.254.169.254),
// NTP (one client request), or the ALTS port 8080 (a gRPC-shaped h2c call to the fake
// handshaker, as grpc-go's ALTS handshaker client makes; or, alts-other, an HTTP/1.1
// GET, which only the node reaches: the proxy's relay carries the handshaker alone).
// The demo runs it with `ip netns exec` inside the namespaces it created: never run it
// in the machine's own network namespace.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
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
		fmt.Fprintln(os.Stderr, "usage: gceprobe dns-udp|dns-tcp NAME | ntp | alts | alts-other")
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
		// What grpc-go's ALTS handshaker client does: a gRPC call over HTTP/2 with
		// prior knowledge to the handshaker service.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var d net.Dialer
		answer, err := fakegce.ALTSHandshakerCall.Do(ctx, d.DialContext, at(gce.ALTSPort))
		if err != nil {
			return "", err
		}
		if answer != fakegce.ALTSHandshakerAnswer {
			return "", fmt.Errorf("answer %q, want %q", answer, fakegce.ALTSHandshakerAnswer)
		}
		return fakegce.ALTSGreeting, nil
	case "alts-other":
		// A plain HTTP/1.1 request to port 8080: not the handshaker service.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var d net.Dialer
		answer, err := fakegce.ALTSOtherProbes[0].Do(ctx, d.DialContext, at(gce.ALTSPort))
		if err != nil {
			return "", fmt.Errorf("no answer: %w", err)
		}
		return answer, nil
	}
	return "", fmt.Errorf("unknown probe %q", what)
}
