package redirect

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/test/simnode"
)

var backends = []Backend{BackendNFT, BackendLegacy}

func privilegedTools(b Backend) []string {
	return []string{"ip", "iptables-" + string(b) + "-restore", "iptables-" + string(b) + "-save", "iptables-" + string(b),
		"ip6tables-" + string(b) + "-restore", "ip6tables-" + string(b) + "-save", "ip6tables-" + string(b)}
}

// newPodNS returns the path of a fresh netns that the test removes at its end.
func newPodNS(t *testing.T) (name, path string) {
	t.Helper()
	name = "mc-redirect-" + simnode.RandomSuffix()
	if _, err := simnode.Run(context.Background(), "ip", "netns", "add", name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := simnode.DeleteNetns(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return name, simnode.NetnsDir + "/" + name
}

func saveIn(t *testing.T, nsName string, b Backend, family Family) string {
	t.Helper()
	prog := "iptables-" + string(b) + "-save"
	if family == IPv6 {
		prog = "ip6tables-" + string(b) + "-save"
	}
	out, err := simnode.Run(context.Background(), "ip", "netns", "exec", nsName, prog)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Apply, Check and Remove against real iptables, both backends and both families: the
// rendered text matches what the kernel reports (Check compares it verbatim), the fast
// paths cost one process, and Remove leaves nothing behind.
func TestApplyCheckRemove(t *testing.T) {
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			testutil.RequirePrivileged(t, privilegedTools(b)...)
			t.Parallel()
			nsName, nsPath := newPodNS(t)
			specs := []Spec{v4Spec(), {
				Family: IPv6, Attachment: att,
				Metadata: []netip.Addr{netip.MustParseAddr("fd20:ce::254")},
				Proxy:    netip.MustParseAddrPort("[fd20:ce::252]:988"),
			}, {
				Family: IPv6, Attachment: Attachment{ContainerID: "other", IfName: "eth0"},
				Metadata: []netip.Addr{netip.MustParseAddr("fd20:ce::254")}, // no proxy6: reject only
			}}
			ctx := context.Background()
			// Inside the netns callback (another goroutine) failures are returned, not Fatal.
			err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
				for _, s := range specs {
					r := NewRunner(b)
					if err := r.Apply(ctx, s, false); err != nil {
						return fmt.Errorf("Apply %s %s: %w", s.Family, s.Attachment, err)
					}
					if r.Total() != 1 {
						t.Errorf("fresh Apply ran %s, want one iptables-restore", r.CountsString())
					}
					if err := NewRunner(b).Check(s); err != nil {
						t.Errorf("Check right after Apply: %v", err)
					}
					// Applying again (the attachment already has rules) reconciles to one set.
					if err := NewRunner(b).Apply(ctx, s, false); err != nil {
						return fmt.Errorf("second Apply: %w", err)
					}
					if err := NewRunner(b).Check(s); err != nil {
						t.Errorf("Check after second Apply: %v", err)
					}
				}
				snap4, err := NewRunner(b).Snapshot(ctx, IPv4)
				if err != nil {
					return err
				}
				if got := snap4.Jumps("nat", att.Chain()); len(got) != 1 {
					t.Errorf("after two Applies nat OUTPUT has %d jumps to %s, want 1", len(got), att.Chain())
				}
				for _, s := range specs {
					r := NewRunner(b)
					removed, err := r.Remove(ctx, s, true)
					if err != nil || !removed {
						return fmt.Errorf("Remove %s %s = %v, %v", s.Family, s.Attachment, removed, err)
					}
					if r.Total() != 1 {
						t.Errorf("Remove of present rules ran %s, want one iptables-restore", r.CountsString())
					}
					if err := NewRunner(b).Check(s); err == nil {
						t.Errorf("Check passes after Remove")
					}
					removed, err = NewRunner(b).Remove(ctx, s, true)
					if err != nil || removed {
						t.Errorf("second Remove = %v, %v; want false, nil", removed, err)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []Family{IPv4, IPv6} {
				if out := saveIn(t, nsName, b, f); strings.Contains(out, ChainPrefix) {
					t.Errorf("%s rules left after Remove:\n%s", f, out)
				}
			}
		})
	}
}
