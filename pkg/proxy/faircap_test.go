package proxy

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
)

// The fair share of a node-wide cap, step by step: "A" pod A takes a unit, "-A"
// gives one back; want is each take's verdict (+ taken, s over its share, f full).
func TestFairCap(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		max   int
		steps string
		want  string
	}{
		// 16: share 2, reserve 4 for pods holding none (small 1).
		{"a pod is held to its share", 16, "A A A A", "++ss"},
		{"a unit given back can be taken again", 16, "A A -A A A", "+++s"},
		{"the reserve goes to pods holding none, one unit each", 16,
			"A A B B C C D D E E F F G G H", "+++++++++++++s+"},
		{"then the cap is full", 16,
			"A A B B C C D D E E F F G G H H I J K", "+++++++++++++s+s++f"},
		// 1,024 (the default): share 128, reserve 256 for pods holding under 8.
		{"the default cap: reserve for pods holding under 8", 1024,
			repeatSteps("A", 128) + " A " + repeatSteps("B", 128) + " " + repeatSteps("C", 128) + " " + repeatSteps("D", 128) + " " +
				repeatSteps("E", 128) + " " + repeatSteps("F", 128) + " " + " X X X X X X X X X",
			strings.Repeat("+", 128) + "s" + strings.Repeat("+", 5*128) + "++++++++s"},
		{"a cap of 1: one unit, one pod", 1, "A B -A B", "+f+"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newFairCap(tc.max, false)
			var got strings.Builder
			for _, step := range strings.Fields(tc.steps) {
				name, give := strings.CutPrefix(step, "-")
				k := podKey{namespace: "ns", name: name}
				if give {
					c.give(k)
					continue
				}
				got.WriteByte("+sf"[c.take(k)])
			}
			if got.String() != tc.want {
				t.Errorf("verdicts %q, want %q", got.String(), tc.want)
			}
		})
	}
	// A cap that queues (upstream requests): over max, pods holding under small still
	// take a unit (and wait for a slot); the others are over their share.
	c := newFairCap(16, true)
	var got strings.Builder
	for _, step := range strings.Fields("A A B B C C D D E E F F G H I J K L L") {
		got.WriteByte("+sf"[c.take(podKey{name: step})])
	}
	if want := strings.Repeat("+", 18) + "s"; got.String() != want { // G..L past 16: they queue
		t.Errorf("queueing cap: verdicts %q, want %q", got.String(), want)
	}
	if c := newFairCap(0, false); c != nil || c.take(podKey{}) != capTaken {
		t.Error("a cap of 0 is not off")
	}
}

func repeatSteps(step string, n int) string {
	return strings.TrimSpace(strings.Repeat(step+" ", n))
}

// BenchmarkFairCap is what a fair share adds to each upstream request (a new long
// poll, a coalesced GET that starts a flight, a request sent on its own): one take
// and one give, from pods sending in parallel (go test -bench FairCap).
func BenchmarkFairCap(b *testing.B) {
	c := newFairCap(DefaultLimits.MaxUpstreamConns, true)
	var next atomic.Int32
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		k := podKey{namespace: "ns", name: fmt.Sprint("pod-", next.Add(1))}
		for pb.Next() {
			if c.take(k) != capTaken {
				b.Fatal("refused")
			}
			c.give(k)
		}
	})
}
