package hostguard

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// podOnVeth joins a new pod netns to the node by a veth pair (10.251.0.0/24, inside the
// test namespaces only), with no rules of its own, and makes conntrack track the
// node's traffic from the start, as a real node's NAT rules (kube-proxy, the CNI's
// masquerade) do.
func podOnVeth(t *testing.T, node *simnode.Node, iptables string) (podName, podPath string) {
	t.Helper()
	ctx := context.Background()
	podName, podPath, err := node.AddRoutedPod("mc-hg-pod", "mcg0", "10.251.0.1/24", "10.251.0.2/24")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.Exec(ctx, iptables, "-t", "nat", "-A", "POSTROUTING", "-s", "10.251.0.0/24", "!", "-d", "10.251.0.0/24", "-j", "MASQUERADE"); err != nil {
		t.Fatal(err)
	}
	return podName, podPath
}

// holdServer accepts TCP connections in the node netns and hands them to the test.
func holdServer(t *testing.T, node *simnode.Node, addr string) <-chan net.Conn {
	t.Helper()
	ln, err := node.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conns := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			conns <- c
		}
	}()
	return conns
}

func accepted(t *testing.T, conns <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-conns:
		return c
	case <-time.After(3 * time.Second):
		t.Fatal("the server accepted no connection")
		return nil
	}
}

// readWithin reads what arrives on c within d.
func readWithin(c net.Conn, d time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	return string(buf[:n]), err
}

// A pod connection made straight to the metadata server before the guard reads nothing
// the server sends after Install (its conntrack entry is deleted, and the server's
// next packet rejected); without the deletion it would (the control shows the test can
// fail). The node's own connection, made before the guard too, is left alone.
func TestInstallCutsDirectPodConnections(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, tc := range []struct {
		name          string
		backend       xtables.Backend
		iptables      string
		keepConntrack bool
	}{
		{"default", xtables.BackendAuto, "iptables", false},
		{"legacy", xtables.BackendLegacy, "iptables-legacy", false},
		{"control: conntrack kept", xtables.BackendAuto, "iptables", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			_, podPath := podOnVeth(t, node, tc.iptables)
			server := holdServer(t, node, "169.254.169.254:80")

			podConn, err := simnode.DialIn(podPath, "tcp", "169.254.169.254:80", 3*time.Second)
			if err != nil {
				t.Fatalf("pod to the metadata server before the guard: %v", err)
			}
			defer podConn.Close()
			podServed := accepted(t, server)
			nodeConn, err := simnode.DialIn(node.Path, "tcp", "169.254.169.254:80", 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer nodeConn.Close()
			nodeServed := accepted(t, server)

			var log strings.Builder
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, Backend: tc.backend, KeepConntrack: tc.keepConntrack}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, newLogger(&log)) }); err != nil {
				t.Fatalf("Install: %v", err)
			}
			deleted := strings.Contains(log.String(), "conntrack_entries_deleted=1")
			if deleted == tc.keepConntrack {
				t.Errorf("want the one pod connection's entry deleted: %v; log:\n%s", !tc.keepConntrack, log.String())
			}

			// The server answers both, as a held long poll would.
			_, _ = podServed.Write([]byte("kube-env secret"))
			_, _ = nodeServed.Write([]byte("node answer"))
			got, err := readWithin(podConn, time.Second)
			switch {
			case tc.keepConntrack && got != "kube-env secret":
				t.Errorf("control: with the entry kept the pod should read the answer, got %q, %v", got, err)
			case !tc.keepConntrack && got != "":
				t.Errorf("the pod's connection made before the guard read %q after it", got)
			}
			if got, err := readWithin(nodeConn, 3*time.Second); got != "node answer" {
				t.Errorf("the node's connection made before the guard: read %q, %v; want it untouched", got, err)
			}
			if !tc.keepConntrack {
				// The pod's next request is redirected to the proxy address, where no
				// socket knows the connection: reset.
				_, _ = podConn.Write([]byte("GET /again"))
				if got, err := readWithin(podConn, 2*time.Second); got != "" || err == nil {
					t.Errorf("the pod's connection made before the guard is still usable: %q, %v", got, err)
				}
			}
		})
	}
}

// The guard gives each port of the metadata address GCE's treatment: DNS (UDP and TCP
// 53) and NTP (UDP 123) reach the server, 8080 goes to the ALTS relay's address (or is
// refused without a relay), 80 to the proxy, every other port is refused at once; the
// node reaches everything directly.
func TestGuardPortTreatment(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, relay := range []bool{true, false} {
		name := map[bool]string{true: "relay", false: "no relay"}[relay]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			_, podPath := podOnVeth(t, node, "iptables")
			err := inNetns(t, node.Path, func() error {
				for addr, name := range map[string]string{
					"169.254.169.254:80": "metadata", "169.254.169.254:53": "dns-tcp", "169.254.169.254:8080": "metadata-8080",
					"169.254.169.254:443": "metadata-443", "169.254.169.252:988": "proxy", "169.254.169.252:987": "relay",
				} {
					ln, err := net.Listen("tcp", addr)
					if err != nil {
						return err
					}
					t.Cleanup(func() { _ = ln.Close() })
					go serveName(ln, name)
				}
				for _, addr := range []string{"169.254.169.254:53", "169.254.169.254:123", "169.254.169.254:5353"} {
					pc, err := net.ListenPacket("udp", addr)
					if err != nil {
						return err
					}
					t.Cleanup(func() { _ = pc.Close() })
					go udpEcho(pc)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}}
			if relay {
				cfg.ALTSListenAddrs = []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")}
			}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatalf("Install: %v", err)
			}
			want8080 := map[bool]string{true: "relay", false: "refused"}[relay]
			for _, c := range []struct{ path, from, network, addr, want string }{
				{podPath, "pod", "tcp", "169.254.169.254:80", "proxy"},
				{podPath, "pod", "tcp", "169.254.169.254:8080", want8080},
				{podPath, "pod", "tcp", "169.254.169.254:53", "dns-tcp"},
				{podPath, "pod", "udp", "169.254.169.254:53", "echo"},
				{podPath, "pod", "udp", "169.254.169.254:123", "echo"},
				{podPath, "pod", "tcp", "169.254.169.254:443", "refused"},
				{podPath, "pod", "udp", "169.254.169.254:5353", "refused"},
				{node.Path, "node", "tcp", "169.254.169.254:80", "metadata"},
				{node.Path, "node", "tcp", "169.254.169.254:8080", "metadata-8080"},
				{node.Path, "node", "tcp", "169.254.169.254:443", "metadata-443"},
				{node.Path, "node", "udp", "169.254.169.254:5353", "echo"},
			} {
				start := time.Now()
				got, err := probe(c.path, c.network, c.addr)
				took := time.Since(start)
				switch {
				case c.want == "refused":
					if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ECONNRESET) {
						t.Errorf("%s %s -> %s: %q, %v; want refused", c.from, c.network, c.addr, got, err)
					} else if took > time.Second {
						t.Errorf("%s %s -> %s refused after %v, want within a second", c.from, c.network, c.addr, took)
					}
				case err != nil || got != c.want:
					t.Errorf("%s %s -> %s: %q, %v; want %q", c.from, c.network, c.addr, got, err, c.want)
				}
			}
		})
	}
}

func newLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }

func udpEcho(pc net.PacketConn) {
	buf := make([]byte, 512)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if string(buf[:n]) == "ping" {
			_, _ = pc.WriteTo([]byte("echo"), from)
		}
	}
}

// probe connects from the netns and returns what answered: the listener's name (TCP)
// or the echo (UDP).
func probe(path, network, addr string) (string, error) {
	if network == "tcp" {
		c, err := simnode.DialIn(path, "tcp", addr, 3*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		b, err := io.ReadAll(c)
		return string(b), err
	}
	c, err := simnode.DialIn(path, "udp", addr, 3*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		return "", err
	}
	return readWithin(c, 3*time.Second)
}
