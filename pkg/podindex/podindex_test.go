package podindex

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestLookup(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	x := New(dir, nil)
	ip := netip.MustParseAddr("10.1.2.3")

	x.Refresh(false)
	if _, ok := x.Lookup(ip); ok {
		t.Fatal("lookup in a missing state dir found a pod")
	}
	rec := state.Record{ContainerID: "c1", IfName: "eth0", Netns: "/proc/1/ns/net",
		IPs: []string{"10.1.2.3", "fd00::3/64"}, PodNamespace: "team-a", PodName: "web-0"}
	if err := state.Write(dir, rec); err != nil {
		t.Fatal(err)
	}
	want := Pod{Namespace: "team-a", Name: "web-0"}
	if _, ok := x.Lookup(ip); ok {
		t.Fatal("a lookup reloaded the index: only the refresher may")
	}
	x.Refresh(false)
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
	x.Refresh(true)
	if got, ok := x.Lookup(netip.MustParseAddr("10.1.2.4")); !ok || got.Name != "web-1" || !got.Exposed {
		t.Fatalf("new record not picked up: %v, %v", got, ok)
	}

	if err := state.Remove(dir, rec.ContainerID, rec.IfName); err != nil {
		t.Fatal(err)
	}
	x.Refresh(true)
	if _, ok := x.Lookup(ip); ok {
		t.Fatal("removed record still resolves after a refresh")
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
	x.Refresh(false)
	if got, ok := x.Lookup(netip.MustParseAddr("10.9.9.9")); !ok || got.Name != "p" {
		t.Fatalf("Lookup = %v, %v; want pod p despite a broken record", got, ok)
	}
}

// A stale record and the IP's new owner: whichever file sorts last, and whatever
// either says about exposure, the IP names no pod (its connections are unattributed).
func TestIPClaimedTwiceNamesNoPod(t *testing.T) {
	t.Parallel()
	ip := netip.MustParseAddr("10.7.0.9")
	for _, exposed := range [][2]bool{{true, false}, {false, true}, {true, true}, {false, false}} {
		dir := t.TempDir()
		for i := range 2 {
			rec := state.Record{ContainerID: []string{"aaaa", "zzzz"}[i], IfName: "eth0", Netns: "/x",
				IPs: []string{ip.String()}, PodNamespace: "ns", PodName: []string{"old", "new"}[i], Exposed: exposed[i]}
			if err := state.Write(dir, rec); err != nil {
				t.Fatal(err)
			}
		}
		x := New(dir, nil)
		x.Refresh(false)
		if got, ok := x.Lookup(ip); ok {
			t.Errorf("exposed %v: Lookup = %+v; want no pod", exposed, got)
		}
	}
}
