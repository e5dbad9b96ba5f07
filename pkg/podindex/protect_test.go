package podindex

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// fakeProtector records the claims it is handed and protects the IPs whose every
// interface is in ok.
type fakeProtector struct {
	mu     sync.Mutex
	ok     map[string]bool
	err    error
	claims []map[netip.Addr][]string
}

func (f *fakeProtector) Protect(_ context.Context, claims map[netip.Addr][]string) (map[netip.Addr]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claims = append(f.claims, maps.Clone(claims))
	if f.err != nil {
		return nil, f.err
	}
	out := map[netip.Addr]bool{}
	for ip, ifs := range claims {
		if !slices.ContainsFunc(ifs, func(s string) bool { return !f.ok[s] }) {
			out[ip] = true
		}
	}
	return out, nil
}

func (f *fakeProtector) last() map[netip.Addr][]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.claims) == 0 {
		return nil
	}
	return f.claims[len(f.claims)-1]
}

func TestExposureNeedsProtection(t *testing.T) {
	t.Parallel()
	a, b, c, d := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("10.0.0.4"), netip.MustParseAddr("10.0.0.5")
	recs := []state.Record{
		{ContainerID: "a", IfName: "eth0", IPs: []string{a.String()}, HostIf: "veth-a", Exposed: true, PodName: "a"},
		{ContainerID: "b", IfName: "eth0", IPs: []string{b.String()}, Exposed: true, PodName: "b"}, // older record: no host interface
		{ContainerID: "c", IfName: "eth0", IPs: []string{c.String()}, HostIf: "veth-gone", Exposed: true, PodName: "c"},
		{ContainerID: "d", IfName: "eth0", IPs: []string{d.String()}, HostIf: "veth-d", PodName: "d"}, // concealed
	}
	for _, tc := range []struct {
		name       string
		protector  *fakeProtector
		wantClaims map[netip.Addr][]string
		exposed    map[netip.Addr]bool
	}{
		{"protected by the guard", &fakeProtector{ok: map[string]bool{"veth-a": true}},
			map[netip.Addr][]string{a: {"veth-a"}, c: {"veth-gone"}}, map[netip.Addr]bool{a: true}},
		{"guard failed: nobody exposed", &fakeProtector{ok: map[string]bool{"veth-a": true}, err: errors.New("iptables-restore failed")},
			map[netip.Addr][]string{a: {"veth-a"}, c: {"veth-gone"}}, map[netip.Addr]bool{}},
		{"no guard: the record decides", nil, nil, map[netip.Addr]bool{a: true, b: true, c: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			for _, r := range recs {
				if err := state.Write(dir, r); err != nil {
					t.Fatal(err)
				}
			}
			var x *Index
			if tc.protector != nil {
				x = New(dir, nil, WithProtector(tc.protector))
			} else {
				x = New(dir, nil)
			}
			for _, ip := range []netip.Addr{a, b, c, d} {
				pod, ok := x.Lookup(ip)
				if !ok {
					t.Fatalf("Lookup(%s) found nothing", ip)
				}
				if pod.Exposed != tc.exposed[ip] {
					t.Errorf("Lookup(%s).Exposed = %v, want %v", ip, pod.Exposed, tc.exposed[ip])
				}
			}
			if tc.protector != nil {
				if got := tc.protector.last(); !maps.EqualFunc(got, tc.wantClaims, slices.Equal) {
					t.Errorf("claims handed to the protector = %v, want %v", got, tc.wantClaims)
				}
			}
		})
	}
}

// TestRefreshWithdrawsClaims: when an exposed pod's record goes, the next Refresh hands
// the protector claims without it, so that its rule does not outlive it (the IP may go
// to another pod).
func TestRefreshWithdrawsClaims(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	p := &fakeProtector{ok: map[string]bool{"veth-a": true}}
	x := New(dir, nil, WithProtector(p))
	rec := state.Record{ContainerID: "a", IfName: "eth0", IPs: []string{"10.0.0.2"}, HostIf: "veth-a", Exposed: true}
	if err := state.Write(dir, rec); err != nil {
		t.Fatal(err)
	}
	x.Refresh(false)
	if got := p.last(); len(got) != 1 {
		t.Fatalf("after Refresh: claims %v, want the exposed pod's", got)
	}
	n := len(p.claims)
	x.Refresh(false)
	if len(p.claims) != n {
		t.Errorf("Refresh without a change reloaded (%d protector calls, want %d)", len(p.claims), n)
	}
	x.Refresh(true)
	if len(p.claims) != n+1 {
		t.Errorf("forced Refresh did not reload")
	}
	if err := state.Remove(dir, "a", "eth0"); err != nil {
		t.Fatal(err)
	}
	x.Refresh(true)
	if got := p.last(); len(got) != 0 {
		t.Errorf("after the record went: claims %v, want none", got)
	}
}
