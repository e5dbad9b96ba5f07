package hostguard

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// routedPod joins a new pod netns to the node by its own veth (10.252.<i>.0/24, ptp
// style, inside the test namespaces only) and returns its netns path.
func routedPod(t *testing.T, node *simnode.Node, i int) string {
	t.Helper()
	_, podPath, err := node.AddRoutedPod("mc-hg-lim", fmt.Sprintf("mcl%d", i),
		fmt.Sprintf("10.252.%d.1/24", i), fmt.Sprintf("10.252.%d.2/24", i))
	if err != nil {
		t.Fatal(err)
	}
	return podPath
}

// acceptAndClose listens on addr in the node netns and closes every connection it
// accepts: a stand-in for the proxy where only the handshake matters.
func acceptAndClose(t *testing.T, node *simnode.Node, addr string) {
	t.Helper()
	ln, err := node.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// dialMany opens n connections at once from the pod netns to addr, each with timeout,
// and reports how many were established and how many of those needed a SYN
// retransmission (a SYN dropped on the way: TCP_INFO's total_retrans). The
// connections are closed before it returns.
func dialMany(podPath, addr string, n int, timeout time.Duration) (established, retransmitted int, firstErr error) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := simnode.DialIn(podPath, "tcp", addr, timeout)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			defer c.Close()
			established++
			raw, err := c.(*net.TCPConn).SyscallConn()
			if err != nil {
				firstErr = err
				return
			}
			var info *unix.TCPInfo
			var ierr error
			if err := raw.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
				firstErr = fmt.Errorf("TCP_INFO: %v %v", err, ierr)
				return
			}
			if info.Total_retrans > 0 {
				retransmitted++
			}
		}()
	}
	wg.Wait()
	return established, retransmitted, firstErr
}

// TestConnLimitInNode installs the guard with its default per-source connection limit
// in a simulated node with two routed pods and a server on the proxy's address, then:
// a pod's start-up burst of 100 new connections at once is accepted without a single
// dropped SYN; a flood of new connections from another pod is cut to about its burst,
// while the first pod's next 100 connections, made during that flood, are again all
// accepted at once; the node's own connections are not limited; Remove leaves no rule
// and no hashlimit table.
func TestConnLimitInNode(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			normal, flooder := routedPod(t, node, 1), routedPod(t, node, 2)
			acceptAndClose(t, node, "169.254.169.252:988")
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ConnRate: DefaultConnRate, ConnBurst: DefaultConnBurst, Backend: b.backend}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, testLogger(t)) }); err != nil {
				t.Fatalf("Install: %v", err)
			}
			lines := guardLines(t, node, b.save)
			if n := countContaining(lines, "-A "+ChainLimit+" -d 169.254.169.252/32 -p tcp -m tcp --dport 988 -m hashlimit --hashlimit-above 100/sec --hashlimit-burst 200 --hashlimit-mode srcip --hashlimit-name mcgb0-988 --hashlimit-htable-size 8192 --hashlimit-htable-max 65536"); n != 1 {
				t.Errorf("%d limit rules for 169.254.169.252:988, want 1:\n%s", n, strings.Join(lines, "\n"))
			}
			if n := countContaining(lines, "-A INPUT ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment \"metaconceal host guard\" -j "+ChainLimit); n != 1 {
				t.Errorf("%d jumps to %s, want 1:\n%s", n, ChainLimit, strings.Join(lines, "\n"))
			}
			if !hashlimitTable(t, node) {
				t.Error("no mcguard hashlimit table in the node netns after Install")
			}

			// Pods reach the proxy through the metadata address (the guard's DNAT).
			const target = "169.254.169.254:80"
			est, retr, err := dialMany(normal, target, 100, 5*time.Second)
			if est != 100 || retr != 0 {
				t.Errorf("start-up burst: %d of 100 connections established, %d after a SYN retransmission (first error: %v); want all at once", est, retr, err)
			}

			// The flood: 600 new connections at once, each given 700 ms (less than the
			// 1 s SYN retransmission timeout, so a dropped SYN fails the dial). With it,
			// the other pod's 100.
			const floodN, floodTimeout = 600, 700 * time.Millisecond
			var fEst int
			var fErr error
			floodStart := time.Now()
			done := make(chan struct{})
			go func() {
				defer close(done)
				fEst, _, fErr = dialMany(flooder, target, floodN, floodTimeout)
			}()
			time.Sleep(50 * time.Millisecond)
			est, retr, err = dialMany(normal, target, 100, 5*time.Second)
			<-done
			floodSecs := time.Since(floodStart).Seconds()
			if est != 100 || retr != 0 {
				t.Errorf("during the flood: %d of the other pod's 100 connections established, %d after a SYN retransmission (first error: %v); want all at once", est, retr, err)
			}
			if limit := DefaultConnBurst + int(DefaultConnRate*floodSecs) + 20; fEst > limit || fEst == floodN {
				t.Errorf("flood: %d of %d connections established within %s (over %.1fs); want at most %d (burst + rate x time)", fEst, floodN, floodTimeout, floodSecs, limit)
			}
			t.Logf("flood: %d of %d new connections established (first refusal: %v)", fEst, floodN, fErr)

			// The node's own connections (lo) are never limited.
			for i := range 300 {
				c, err := simnode.DialIn(node.Path, "tcp", "169.254.169.252:988", 900*time.Millisecond)
				if err != nil {
					t.Fatalf("node's own connection #%d: %v", i+1, err)
				}
				c.Close()
			}

			for i := range 2 {
				if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, testLogger(t)) }); err != nil {
					t.Fatalf("Remove #%d: %v", i+1, err)
				}
			}
			if lines := guardLines(t, node, b.save); len(lines) != 0 {
				t.Errorf("after Remove, %s still shows:\n%s", b.save, strings.Join(lines, "\n"))
			}
			if out, err := node.Exec(ctx, b.save); err != nil || strings.Contains(out, ChainLimit) || strings.Contains(out, "hashlimit") {
				t.Errorf("after Remove (%v):\n%s", err, out)
			}
			if hashlimitTable(t, node) {
				t.Error("an mcguard hashlimit table is left in the node netns after Remove")
			}
		})
	}
}

// TestConnLimitTurnedOff reinstalls the guard without a rate over one with it: the
// chain and its jump are gone, the rest of the guard stays.
func TestConnLimitTurnedOff(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-restore")
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			node := newNode(t)
			cfg := Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")},
				ALTSListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:987")},
				ConnRate:        10, ConnBurst: 20, Backend: b.backend}
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, nil) }); err != nil {
				t.Fatal(err)
			}
			lines := guardLines(t, node, b.save)
			if n := countContaining(lines, "-A "+ChainLimit+" "); n != 5 {
				t.Errorf("%d limit rules with the relay on, want 5 (proxy, relay, and the three attested ports):\n%s", n, strings.Join(lines, "\n"))
			}
			cfg.ConnRate, cfg.ConnBurst = 0, 0
			if err := inNetns(t, node.Path, func() error { return Install(ctx, cfg, nil) }); err != nil {
				t.Fatal(err)
			}
			lines = guardLines(t, node, b.save)
			if n := countContaining(lines, ChainLimit); n != 0 {
				t.Errorf("limit turned off, yet:\n%s", strings.Join(lines, "\n"))
			}
			if n := countContaining(lines, "-j DNAT"); n != 2 {
				t.Errorf("the rest of the guard is gone:\n%s", strings.Join(lines, "\n"))
			}
			if err := inNetns(t, node.Path, func() error { return Remove(ctx, cfg, nil) }); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func countContaining(lines []string, sub string) int {
	n := 0
	for _, l := range lines {
		if strings.Contains(l, sub) {
			n++
		}
	}
	return n
}

// hashlimitTable reports whether the node netns has a hashlimit table of the guard
// (/proc/thread-self/net/ipt_hashlimit/mcg*: the calling thread is in the netns).
func hashlimitTable(t *testing.T, node *simnode.Node) bool {
	t.Helper()
	found := false
	err := inNetns(t, node.Path, func() error {
		ents, err := os.ReadDir("/proc/thread-self/net/ipt_hashlimit")
		if err != nil {
			return nil // no hashlimit table at all in this netns
		}
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "mcg") {
				found = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}
