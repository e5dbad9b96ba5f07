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
