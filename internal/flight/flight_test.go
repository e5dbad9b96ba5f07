package flight

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// countCap grants up to max units, by owner.
type countCap struct {
	mu   sync.Mutex
	max  int
	used map[string]int
}

var errFull = errors.New("full")

func (c *countCap) Take(o string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, u := range c.used {
		n += u
	}
	if n >= c.max {
		return errFull
	}
	c.used[o]++
	return nil
}

func (c *countCap) Give(o string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.used[o]--
}

func value(v int) func(bool) int { return func(bool) int { return v } }

func TestJoinSharesOneFlight(t *testing.T) {
	g := New[string, string, int, *int](Config[string]{})
	f1, started1, err1 := g.Join("k", "a")
	f2, started2, err2 := g.Join("k", "b")
	f3, started3, _ := g.Join("other", "a")
	if err1 != nil || err2 != nil || !started1 || started2 || f1 != f2 {
		t.Fatalf("Join twice: (%p, %v, %v), (%p, %v, %v); want one flight started once", f1, started1, err1, f2, started2, err2)
	}
	if !started3 || f3 == f1 || g.Len() != 2 {
		t.Fatalf("another key: started %v, same flight %v, open %d; want a second flight", started3, f3 == f1, g.Len())
	}
	g.Finish(f1, value(7), nil)
	<-f2.Done()
	if f2.Result() != 7 || g.Len() != 1 {
		t.Errorf("after Finish: result %d, open %d; want 7 and 1", f2.Result(), g.Len())
	}
	if f, started, _ := g.Join("k", "a"); !started || f == f1 {
		t.Errorf("Join after Finish: started %v, same flight %v; want a new flight", started, f == f1)
	}
}

func TestLastWaiterCancels(t *testing.T) {
	tests := []struct {
		name    string
		waiters int
		leave   int
		want    bool // cancelled
	}{
		{"one of two leaves", 2, 1, false},
		{"both leave", 2, 2, true},
		{"the only one leaves", 1, 1, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := New[string, string, int, *int](Config[string]{})
			var f *Flight[string, string, int, *int]
			for range tc.waiters {
				f, _, _ = g.Join("k", "a")
			}
			for range tc.leave {
				g.Leave(f)
			}
			if got := f.Context().Err() != nil; got != tc.want {
				t.Errorf("cancelled = %v; want %v", got, tc.want)
			}
			if tc.want && g.Len() != 0 {
				t.Errorf("open flights %d after the last waiter left; want 0", g.Len())
			}
		})
	}
}

func TestFinishReportsAbandoned(t *testing.T) {
	g := New[string, string, int, *int](Config[string]{})
	f, _, _ := g.Join("k", "a")
	g.Leave(f)
	var abandoned bool
	g.Finish(f, func(a bool) int { abandoned = a; return 0 }, nil)
	if !abandoned {
		t.Error("Finish after the last waiter left: abandoned = false; want true")
	}
}

func TestCapChargesStarterUntilFinish(t *testing.T) {
	c := &countCap{max: 1, used: map[string]int{}}
	g := New[string, string, int, *int](Config[string]{Cap: c})
	f, _, err := g.Join("k1", "a")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := g.Join("k1", "b"); err != nil {
		t.Errorf("joining an open flight at the cap: %v; want allowed", err)
	}
	if _, _, err := g.Join("k2", "b"); !errors.Is(err, errFull) {
		t.Errorf("a new flight over the cap: %v; want the cap's error", err)
	}
	g.Finish(f, value(1), nil)
	if c.used["a"] != 0 {
		t.Errorf("owner still charged %d after Finish; want 0", c.used["a"])
	}
	if _, _, err := g.Join("k2", "b"); err != nil {
		t.Errorf("a new flight after the unit came back: %v", err)
	}
}

func TestParkedWaitersDeliveredOnce(t *testing.T) {
	g := New[string, string, int, *int](Config[string]{Parking: true})
	f, _, _ := g.Join("k", "a")
	p1, p2, p3 := new(int), new(int), new(int)
	for _, p := range []*int{p1, p2, p3} {
		if p != p1 {
			g.Join("k", "a")
		}
		if !g.Park(f, p) {
			t.Fatal("Park on an open flight: false")
		}
	}
	if !g.Unpark(f, p3) {
		t.Error("Unpark of a parked waiter: false")
	}
	var got []*int
	var result int
	g.Finish(f, value(9), func(r int, parked []*int) { result, got = r, parked })
	if result != 9 || len(got) != 2 {
		t.Fatalf("deliver got result %d and %d waiters; want 9 and 2", result, len(got))
	}
	if g.Unpark(f, p1) {
		t.Error("Unpark after delivery: true; want false (delivery took it)")
	}
	if g.Park(f, new(int)) {
		t.Error("Park after Finish: true; want false")
	}
	g.Finish(f, value(10), func(int, []*int) { t.Error("second Finish delivered again") })
	if f.Result() != 9 {
		t.Errorf("result after a second Finish = %d; want 9", f.Result())
	}
}

func TestStartIfNoneHoldsItsOwnReference(t *testing.T) {
	g := New[string, string, int, *int](Config[string]{})
	f := g.StartIfNone("k")
	if f == nil || g.StartIfNone("k") != nil {
		t.Fatal("StartIfNone: want a flight, then nil while it is open")
	}
	j, started, _ := g.Join("k", "a")
	g.Leave(j)
	if started || f.Context().Err() != nil {
		t.Errorf("a joiner leaving cancelled the refresh (started %v, err %v)", started, f.Context().Err())
	}
	g.Finish(f, value(1), nil)
}

func TestStopAndWait(t *testing.T) {
	done := make(chan struct{}, 1)
	g := New[string, string, int, *int](Config[string]{OnDone: func() { done <- struct{}{} }})
	f, _, _ := g.Join("k", "a")
	g.Stop()
	if _, _, err := g.Join("k2", "a"); !errors.Is(err, ErrClosed) {
		t.Errorf("Join after Stop: %v; want ErrClosed", err)
	}
	if g.Wait(0) {
		t.Error("Wait with a flight running: true")
	}
	go g.Finish(f, value(1), nil)
	if !g.Wait(time.Minute) {
		t.Error("Wait after Finish: false")
	}
	<-done // OnDone ran
}

func TestBaseCancelsFlights(t *testing.T) {
	base, cancel := context.WithCancel(context.Background())
	g := New[string, string, int, *int](Config[string]{Base: base})
	f, _, _ := g.Join("k", "a")
	var seen []string
	g.Open(func(o *Flight[string, string, int, *int]) { seen = append(seen, o.Key()) })
	cancel()
	if f.Context().Err() == nil || len(seen) != 1 || seen[0] != "k" {
		t.Errorf("base cancelled: flight err %v, open %v; want cancelled and [k]", f.Context().Err(), seen)
	}
}
