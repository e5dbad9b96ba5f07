package reuseport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// serveOnce answers every connection of ln with name and closes it.
func serveOnce(ln net.Listener, name string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			_, _ = c.Write([]byte(name))
			c.Close()
		}()
	}
}

// Two instances on one address in a simulated node: the second binds beside the
// first only with SO_REUSEPORT, and while clients dial without pause, the first
// closes its listener (as a draining proxy does) and no connection is refused or
// left unanswered.
func TestTwoInstancesOneAddress(t *testing.T) {
	testutil.RequirePrivileged(t, "ip")
	node, err := simnode.New("reuseport")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })
	if err := simnode.In(node.Path, func() error {
		_, err := MigrateReq("/proc/sys")
		return err
	}); err != nil {
		t.Fatalf("tcp_migrate_req in the node: %v", err)
	}
	var old net.Listener
	if err := simnode.In(node.Path, func() error {
		var err error
		old, err = Listen(context.Background(), "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	addr := old.Addr().String()

	// Without SO_REUSEPORT the new instance cannot bind: the surge pod would fail.
	if err := simnode.In(node.Path, func() error {
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			ln.Close()
		}
		return err
	}); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("plain listen beside a SO_REUSEPORT listener: %v; want EADDRINUSE", err)
	}
	var cur net.Listener
	if err := simnode.In(node.Path, func() error {
		var err error
		cur, err = Listen(context.Background(), addr)
		return err
	}); err != nil {
		t.Fatalf("second SO_REUSEPORT listener on %s: %v", addr, err)
	}
	t.Cleanup(func() { cur.Close() })
	go serveOnce(old, "old")
	go serveOnce(cur, "new")

	const dials = 600
	var (
		mu       sync.Mutex
		failures []string
		answered = map[string]int{}
		wg       sync.WaitGroup
	)
	closeAt := make(chan struct{})
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range dials / 4 {
				if w == 0 && i == dials/8 {
					close(closeAt)
				}
				c, err := simnode.DialIn(node.Path, "tcp", addr, 2*time.Second)
				if err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("dial: %v", err))
					mu.Unlock()
					continue
				}
				_ = c.SetDeadline(time.Now().Add(2 * time.Second))
				b, err := io.ReadAll(c)
				c.Close()
				mu.Lock()
				if err != nil || len(b) == 0 {
					failures = append(failures, fmt.Sprintf("no answer: %q, %v", b, err))
				} else {
					answered[string(b)]++
				}
				mu.Unlock()
			}
		}()
	}
	<-closeAt
	old.Close() // the old instance drains
	wg.Wait()
	if len(failures) > 0 {
		t.Errorf("%d of %d connections failed while the old listener closed, e.g. %s", len(failures), dials, failures[0])
	}
	if answered["new"] == 0 {
		t.Errorf("answers %v: the new instance served none", answered)
	}
	t.Logf("answers: %v", answered)
}

// What net.ipv4.tcp_migrate_req changes, shown in two simulated nodes: connections
// that completed their handshake on the old instance's listener but were not yet
// accepted (its accept queue) when it closes are reset with the sysctl at 0, and
// moved to the new instance's listener and answered with it at 1. The old listener
// here never accepts, so every connection the kernel hashes to it is such a
// connection.
func TestMigrateReqMovesQueuedConnections(t *testing.T) {
	testutil.RequirePrivileged(t, "ip")
	for _, tc := range []struct {
		migrate  bool
		wantLost bool
	}{{migrate: false, wantLost: true}, {migrate: true, wantLost: false}} {
		t.Run(fmt.Sprintf("tcp_migrate_req=%v", tc.migrate), func(t *testing.T) {
			t.Parallel()
			node, err := simnode.New("migrate")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = node.Close() })
			var old, cur net.Listener
			if err := simnode.In(node.Path, func() error {
				if tc.migrate {
					if _, err := MigrateReq("/proc/sys"); err != nil {
						return err
					}
				} else if _, err := setSysctl("/proc/sys/"+MigrateReqFile, "0"); err != nil {
					return err
				}
				var err error
				if old, err = Listen(context.Background(), "127.0.0.1:0"); err != nil {
					return err
				}
				cur, err = Listen(context.Background(), old.Addr().String())
				return err
			}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cur.Close() })
			go serveOnce(cur, "new")
			addr := old.Addr().String()

			// Dial until some connections sit in the old listener's queue: those the
			// new one has not answered within a moment.
			const dials = 64
			conns := make([]net.Conn, 0, dials)
			t.Cleanup(func() {
				for _, c := range conns {
					c.Close()
				}
			})
			for range dials {
				c, err := simnode.DialIn(node.Path, "tcp", addr, 2*time.Second)
				if err != nil {
					t.Fatalf("dial %s: %v", addr, err)
				}
				conns = append(conns, c)
			}
			queued := 0
			var waiting []net.Conn
			answeredBy := time.Now().Add(300 * time.Millisecond) // one moment for all
			for _, c := range conns {
				_ = c.SetReadDeadline(answeredBy)
				b := make([]byte, 8)
				if n, err := c.Read(b); err == nil && string(b[:n]) == "new" {
					continue // hashed to the new listener: answered
				}
				queued++
				waiting = append(waiting, c)
			}
			if queued == 0 {
				t.Fatalf("none of %d connections was hashed to the old listener: nothing to migrate", dials)
			}
			old.Close() // the old instance drains: its queue is reset or moved
			lost, moved := 0, 0
			movedBy := time.Now().Add(2 * time.Second)
			for _, c := range waiting {
				_ = c.SetReadDeadline(movedBy)
				b, err := io.ReadAll(c)
				if err == nil && string(b) == "new" {
					moved++
				} else {
					lost++
				}
			}
			t.Logf("%d of %d connections queued on the old listener when it closed: %d moved to the new one and answered, %d lost", queued, dials, moved, lost)
			if tc.wantLost && lost == 0 {
				t.Errorf("tcp_migrate_req=0: no queued connection was lost; the test no longer shows what the sysctl changes")
			}
			if !tc.wantLost && lost > 0 {
				t.Errorf("tcp_migrate_req=1: %d of %d queued connections lost when the old listener closed", lost, queued)
			}
		})
	}
}
