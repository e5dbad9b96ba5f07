package redirect

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

var backends = []xtables.Backend{xtables.BackendNFT, xtables.BackendLegacy}

func privilegedTools(b xtables.Backend) []string {
	tools := []string{"ip"}
	for _, f := range xtables.Families {
		n, err := xtables.Names(b, f)
		if err != nil {
			panic(err) // backends lists only known ones
		}
		tools = append(tools, n.Restore, n.Save, n.Iptables)
	}
	return tools
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

func saveIn(t *testing.T, nsName string, b xtables.Backend, family xtables.Family) string {
	t.Helper()
	names, err := xtables.Names(b, family)
	if err != nil {
		t.Fatal(err)
	}
	out, err := simnode.Run(context.Background(), "ip", "netns", "exec", nsName, names.Save)
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
				Family: xtables.IPv6, Attachment: att,
				Metadata: []netip.Addr{netip.MustParseAddr("fd20:ce::254")},
				Proxy:    netip.MustParseAddrPort("[fd20:ce::252]:988"),
			}, {
				Family: xtables.IPv6, Attachment: Attachment{ContainerID: "other", IfName: "eth0"},
				Metadata: []netip.Addr{netip.MustParseAddr("fd20:ce::254")}, // no proxy6: reject only
			}}
			ctx := context.Background()
			// Inside the netns callback (another goroutine) failures are returned, not Fatal.
			err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
				for _, s := range specs {
					r := xtables.NewRunner(b)
					if err := Apply(ctx, r, s, false); err != nil {
						return fmt.Errorf("Apply %s %s: %w", s.Family, s.Attachment, err)
					}
					if r.Total() != 1 {
						t.Errorf("fresh Apply ran %s, want one iptables-restore", r.CountsString())
					}
					if err := Check(xtables.NewRunner(b), s); err != nil {
						t.Errorf("Check right after Apply: %v", err)
					}
					// Applying again (the attachment already has rules) reconciles to one set.
					if err := Apply(ctx, xtables.NewRunner(b), s, false); err != nil {
						return fmt.Errorf("second Apply: %w", err)
					}
					if err := Check(xtables.NewRunner(b), s); err != nil {
						t.Errorf("Check after second Apply: %v", err)
					}
				}
				snap4, err := xtables.NewRunner(b).Snapshot(ctx, xtables.IPv4)
				if err != nil {
					return err
				}
				if got := snap4.Jumps("nat", att.Chain()); len(got) != 1 {
					t.Errorf("after two Applies nat OUTPUT has %d jumps to %s, want 1", len(got), att.Chain())
				}
				for _, s := range specs {
					r := xtables.NewRunner(b)
					removed, err := Remove(ctx, r, s, true)
					if err != nil || !removed {
						return fmt.Errorf("Remove %s %s = %v, %v", s.Family, s.Attachment, removed, err)
					}
					if r.Total() != 1 {
						t.Errorf("Remove of present rules ran %s, want one iptables-restore", r.CountsString())
					}
					if err := Check(xtables.NewRunner(b), s); err == nil {
						t.Errorf("Check passes after Remove")
					}
					removed, err = Remove(ctx, xtables.NewRunner(b), s, true)
					if err != nil || removed {
						t.Errorf("second Remove = %v, %v; want false, nil", removed, err)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []xtables.Family{xtables.IPv4, xtables.IPv6} {
				if out := saveIn(t, nsName, b, f); strings.Contains(out, ChainPrefix) {
					t.Errorf("%s rules left after Remove:\n%s", f, out)
				}
			}
		})
	}
}

// fakeRestore writes an executable shell script named like b's xtables.IPv4 restore program
// with body, and returns b's xtables.IPv4 tools with it as Restore. $REAL in body is the real
// program.
func fakeRestore(t *testing.T, b xtables.Backend, body string) xtables.Tools {
	t.Helper()
	real, err := xtables.ToolsFor(b, xtables.IPv4)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "iptables-"+string(b)+"-restore")
	script := "#!/bin/sh\nREAL=" + real.Restore + "\n" + body + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	real.Restore = path
	return real
}

// applyIn installs v4Spec in the netns at nsPath and fails the test otherwise.
func applyIn(t *testing.T, nsPath string, b xtables.Backend) {
	t.Helper()
	if err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		return Apply(context.Background(), xtables.NewRunner(b), v4Spec(), false)
	}); err != nil {
		t.Fatal(err)
	}
}

// removeIn runs r.Remove of v4Spec (rules likely present) in the netns at nsPath.
func removeIn(t *testing.T, nsPath string, r *xtables.Runner) (bool, error) {
	t.Helper()
	var removed bool
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		removed, err = Remove(context.Background(), r, v4Spec(), true)
		return err
	})
	return removed, err
}

// Remove returns only once its restore process has exited: here the process lingers
// 300 ms after its commit and then leaves a mark, which must be there when Remove
// returns. Nothing the Runner started is left running.
func TestRemoveWaitsForRestore(t *testing.T) {
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			testutil.RequirePrivileged(t, privilegedTools(b)...)
			t.Parallel()
			nsName, nsPath := newPodNS(t)
			applyIn(t, nsPath, b)
			mark := filepath.Join(t.TempDir(), "exited")
			r := xtables.NewRunner(b)
			r.SetTools(xtables.IPv4, fakeRestore(t, b, `"$REAL" "$@" || exit $?`+"\nsleep 0.3\n: >"+mark))
			removed, err := removeIn(t, nsPath, r)
			if err != nil || !removed {
				t.Fatalf("Remove = %v, %v; want true, nil", removed, err)
			}
			if _, err := os.Stat(mark); err != nil {
				t.Errorf("Remove returned before its restore process exited: %v", err)
			}
			if r.Total() != 1 {
				t.Errorf("Remove ran %s, want one iptables-restore", r.CountsString())
			}
			if out := saveIn(t, nsName, b, xtables.IPv4); strings.Contains(out, ChainPrefix) {
				t.Errorf("rules left after Remove:\n%s", out)
			}
		})
	}
}

// A restore that fails is reported, and the rules stay. The fake fails after its
// first line, as a real restore stops at the failing line; Remove then looked
// (iptables-save) and tried once more, with the same fake.
func TestRemoveFailingRestoreReportsError(t *testing.T) {
	testutil.RequirePrivileged(t, privilegedTools(xtables.BackendNFT)...)
	t.Parallel()
	nsName, nsPath := newPodNS(t)
	applyIn(t, nsPath, xtables.BackendNFT)
	before := rulesOf(saveIn(t, nsName, xtables.BackendNFT, xtables.IPv4))
	r := xtables.NewRunner(xtables.BackendNFT)
	r.SetTools(xtables.IPv4, fakeRestore(t, xtables.BackendNFT, `read -r line; echo "forced failure" >&2; exit 1`))
	if _, err := removeIn(t, nsPath, r); err == nil || !strings.Contains(err.Error(), "forced failure") {
		t.Fatalf("Remove with a failing restore = %v, want its error", err)
	}
	if got := r.Counts(); got["iptables-nft-restore"] != 2 || got["iptables-nft-save"] != 1 {
		t.Errorf("Remove ran %v, want 2 restores and 1 save", got)
	}
	if after := rulesOf(saveIn(t, nsName, xtables.BackendNFT, xtables.IPv4)); after != before || !strings.Contains(after, "-A "+att.Chain()) {
		t.Errorf("the rules should still be there after a failed removal:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// rulesOf keeps the chain and rule lines of iptables-save output (no comments, no
// counters).
func rulesOf(save string) string {
	var keep []string
	for _, l := range strings.Split(save, "\n") {
		if strings.HasPrefix(l, "-A ") || strings.HasPrefix(l, "*") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// restore commits table by table: when the nat table's deletion commits and the
// filter table's fails (another rule still jumps to the chain), Remove looks at what
// is left and removes it, the foreign jump included.
func TestRemoveAfterPartialCommit(t *testing.T) {
	testutil.RequirePrivileged(t, privilegedTools(xtables.BackendNFT)...)
	t.Parallel()
	nsName, nsPath := newPodNS(t)
	applyIn(t, nsPath, xtables.BackendNFT)
	if _, err := simnode.Run(context.Background(), "ip", "netns", "exec", nsName, "iptables-nft", "-A", "INPUT", "-j", att.Chain()); err != nil {
		t.Fatal(err)
	}
	r := xtables.NewRunner(xtables.BackendNFT)
	removed, err := removeIn(t, nsPath, r)
	if err != nil || !removed {
		t.Fatalf("Remove = %v, %v; want true, nil", removed, err)
	}
	if got := r.Counts(); got["iptables-nft-restore"] != 2 || got["iptables-nft-save"] != 1 {
		t.Errorf("Remove ran %v, want the failing fast restore, a save and a second restore", got)
	}
	if out := saveIn(t, nsName, xtables.BackendNFT, xtables.IPv4); strings.Contains(out, ChainPrefix) {
		t.Errorf("rules left after Remove:\n%s", out)
	}
}
