package podindex

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// blockingAttestor records what it is handed and, while gate is open, blocks.
type blockingAttestor struct {
	mu      sync.Mutex
	calls   [][]state.Record
	entered chan struct{}
	gate    chan struct{}
	err     error
}

func (b *blockingAttestor) Attest(_ context.Context, recs []state.Record) error {
	b.mu.Lock()
	b.calls = append(b.calls, recs)
	b.mu.Unlock()
	if b.entered != nil {
		b.entered <- struct{}{}
	}
	if b.gate != nil {
		<-b.gate
	}
	return b.err
}

// TestLookupDoesNotWaitOnAttest: while the attestor (an iptables-restore) is stuck,
// lookups answer from the snapshot at once, and the new pod is already known.
// Without the refresher (lookups reloading and attesting inline, as before issue 19)
// the lookup below would block on the gate and the test would time out.
func TestLookupDoesNotWaitOnAttest(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := &blockingAttestor{entered: make(chan struct{}, 1), gate: make(chan struct{})}
	x := New(dir, nil, WithAttestor(a))
	if err := state.Write(dir, state.Record{ContainerID: "c1", IfName: "eth0", IPs: []string{"10.0.0.2"}, HostIf: "veth1", PodNamespace: "ns", PodName: "p"}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); x.Refresh(false) }()
	<-a.entered // the refresher is inside Attest, and stays there
	looked := make(chan error, 1)
	go func() {
		for range 1000 {
			if pod, ok := x.Lookup(netip.MustParseAddr("10.0.0.2")); !ok || pod.Name != "p" {
				looked <- fmt.Errorf("Lookup during a blocked Attest = %+v, %v; want pod p from the published snapshot", pod, ok)
				return
			}
			if _, ok := x.Lookup(netip.MustParseAddr("10.0.0.9")); ok {
				looked <- errors.New("unknown IP found")
				return
			}
		}
		looked <- nil
	}()
	select {
	case err := <-looked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second): // a liveness bound, not a measurement: 1000 lookups take microseconds
		close(a.gate)
		t.Fatal("lookups waited on the blocked Attest")
	}
	close(a.gate)
	<-done
	if len(a.calls) != 1 || len(a.calls[0]) != 1 || a.calls[0][0].HostIf != "veth1" {
		t.Errorf("Attest got %+v; want the one record", a.calls)
	}
}

// TestRefreshRetriesFailedAttest: a failed Attest is applied again at the next
// refresh even when the records did not change; an unchanged, applied set is not.
func TestRefreshRetriesFailedAttest(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := &blockingAttestor{err: context.DeadlineExceeded}
	x := New(dir, nil, WithAttestor(a))
	x.Refresh(false)
	x.Refresh(false)
	a.err = nil
	x.Refresh(false)
	x.Refresh(false)
	if len(a.calls) != 3 {
		t.Errorf("Attest calls = %d; want 3 (two failed, one success, then nothing to do)", len(a.calls))
	}
}

// TestRunFollowsTheStateDir: the refresher picks up a new record and hands it to the
// attestor. The interval is an hour, so only the inotify wake-up can do it in time.
func TestRunFollowsTheStateDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := &blockingAttestor{}
	x := New(dir, nil, WithAttestor(a))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); x.Run(ctx, time.Hour, 0) }()
	t.Cleanup(func() { cancel(); <-done })
	// Written until seen: the watch may be added just after the first write.
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		if err := state.Write(dir, state.Record{ContainerID: fmt.Sprint("c", i), IfName: "eth0", IPs: []string{fmt.Sprintf("10.0.%d.2", i)}, PodName: "p"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		a.mu.Lock()
		n := len(a.calls)
		a.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) { // a liveness bound: inotify answers in microseconds
			t.Fatal("the refresher did not pick up new records within 10 s with an hour's interval")
		}
	}
	if _, ok := x.Lookup(netip.MustParseAddr("10.0.0.2")); !ok {
		t.Error("the new record's IP is not in the snapshot after the refresh")
	}
}
