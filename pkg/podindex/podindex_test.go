package podindex

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestLookup(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	x := New(dir, nil)
	ip := netip.MustParseAddr("10.1.2.3")

	if _, ok := x.Lookup(ip); ok {
		t.Fatal("lookup in a missing state dir found a pod")
	}
	rec := state.Record{ContainerID: "c1", IfName: "eth0", Netns: "/proc/1/ns/net",
		IPs: []string{"10.1.2.3", "fd00::3/64"}, PodNamespace: "team-a", PodName: "web-0"}
	if err := state.Write(dir, rec); err != nil {
		t.Fatal(err)
	}
	want := Pod{Namespace: "team-a", Name: "web-0"}
	if got, ok := x.Lookup(ip); !ok || got != want {
		t.Fatalf("Lookup(%s) = %v, %v; want %v", ip, got, ok, want)
	}
	if got, ok := x.Lookup(netip.MustParseAddr("fd00::3")); !ok || got != want {
		t.Fatalf("Lookup(fd00::3) = %v, %v; want %v (CIDR form in the record)", got, ok, want)
	}
	if got, ok := x.Lookup(netip.MustParseAddr("::ffff:10.1.2.3")); !ok || got != want {
		t.Fatalf("Lookup of the IPv4-mapped form = %v, %v; want %v", got, ok, want)
	}

	rec2 := rec
	rec2.ContainerID, rec2.IPs, rec2.PodName = "c2", []string{"10.1.2.4"}, "web-1"
	rec2.Exposed, rec2.ExposedReason = true, "excludeNamespaces"
	if err := state.Write(dir, rec2); err != nil {
		t.Fatal(err)
	}
	if got, ok := x.Lookup(netip.MustParseAddr("10.1.2.4")); !ok || got.Name != "web-1" || !got.Exposed {
		t.Fatalf("new record not picked up: %v, %v", got, ok)
	}

	if err := state.Remove(dir, rec.ContainerID, rec.IfName); err != nil {
		t.Fatal(err)
	}
	// The removal bumps the dir mtime; on file systems with coarse mtimes it may not,
	// and the index then notices at the next miss after MissReloadInterval.
	deadline := time.Now().Add(2 * time.Second)
	for {
		if _, ok := x.Lookup(ip); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("removed record still resolves after 2s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if x.Len() != 1 {
		t.Errorf("Len = %d, want 1", x.Len())
	}
}

func TestUnreadableRecordDoesNotHideOthers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := state.Write(dir, state.Record{ContainerID: "c1", IfName: "eth0", IPs: []string{"10.9.9.9"}, PodNamespace: "ns", PodName: "p"}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "broken-eth0.json"), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	x := New(dir, nil)
	if got, ok := x.Lookup(netip.MustParseAddr("10.9.9.9")); !ok || got.Name != "p" {
		t.Fatalf("Lookup = %v, %v; want pod p despite a broken record", got, ok)
	}
}

// A stale exposed record and the IP's new, concealed owner: whichever file sorts last,
// the IP must not be treated as exposed.
func TestIPClaimedTwiceIsExposedOnlyIfBothAre(t *testing.T) {
	t.Parallel()
	ip := netip.MustParseAddr("10.7.0.9")
	for _, tc := range []struct {
		name                    string
		firstExposed, secondExp bool
		wantExposed             bool
	}{
		{"stale exposed sorts first", true, false, false},
		{"stale exposed sorts last", false, true, false},
		{"both exposed", true, true, true},
		{"neither exposed", false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			for i, exposed := range []bool{tc.firstExposed, tc.secondExp} {
				rec := state.Record{ContainerID: []string{"aaaa", "zzzz"}[i], IfName: "eth0", Netns: "/x",
					IPs: []string{ip.String()}, PodNamespace: "ns", PodName: []string{"old", "new"}[i], Exposed: exposed}
				if err := state.Write(dir, rec); err != nil {
					t.Fatal(err)
				}
			}
			got, ok := New(dir, nil).Lookup(ip)
			if !ok || got.Exposed != tc.wantExposed {
				t.Fatalf("Lookup = %+v, %v; want found with Exposed=%v", got, ok, tc.wantExposed)
			}
		})
	}
}
