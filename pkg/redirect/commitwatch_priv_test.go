package redirect

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/test/simnode"
)

// fakeRestore writes an executable shell script named like the nft restore program
// (so that Runner treats it as nf_tables) with body, and returns the tools of the nft
// backend for IPv4 with it as Restore. $REAL in body is the real program.
func fakeRestore(t *testing.T, body string) Tools {
	t.Helper()
	real, err := ToolsFor(BackendNFT, IPv4)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "iptables-nft-restore")
	script := "#!/bin/sh\nREAL=" + real.Restore + "\n" + body + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	real.Restore = path
	return real
}

// applyIn installs v4Spec in the netns at nsPath and fails the test otherwise.
func applyIn(t *testing.T, nsPath string, b Backend) {
	t.Helper()
	if err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		return NewRunner(b).Apply(context.Background(), v4Spec(), false)
	}); err != nil {
		t.Fatal(err)
	}
}

// With ReturnOnCommit on nf_tables, Remove returns once the deletion is committed,
// before the restore process exits: here the process stays alive for 3 s after its
// commit, so only the early return can make Remove report a detached process (a real
// restore lingers restoreLinger after its input, which only makes that likely). What is
// left afterwards is read after the commit, so it must be nothing. On legacy the
// process is always waited for.
func TestRemoveReturnsOnCommit(t *testing.T) {
	cases := []struct {
		name         string
		backend      Backend
		tools        func(t *testing.T) Tools // nil: the backend's own
		wantDetached int
	}{
		{"nft process outlives commit", BackendNFT, func(t *testing.T) Tools {
			return fakeRestore(t, `"$REAL" "$@" || exit $?`+"\nexec sleep 3")
		}, 1},
		{"nft", BackendNFT, nil, -1}, // either way, depending on timing
		{"legacy", BackendLegacy, nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			testutil.RequirePrivileged(t, privilegedTools(tc.backend)...)
			t.Parallel()
			nsName, nsPath := newPodNS(t)
			applyIn(t, nsPath, tc.backend)
			r := NewRunner(tc.backend)
			r.ReturnOnCommit = true
			if tc.tools != nil {
				r.SetTools(IPv4, tc.tools(t))
			}
			var removed bool
			err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
				var err error
				removed, err = r.Remove(context.Background(), v4Spec(), true)
				return err
			})
			if err != nil || !removed {
				t.Fatalf("Remove = %v, %v; want true, nil", removed, err)
			}
			t.Logf("ran %s, detached %d, in %v", r.CountsString(), r.Detached(), r.Elapsed())
			if r.Total() != 1 {
				t.Errorf("Remove ran %s, want one iptables-restore", r.CountsString())
			}
			if tc.wantDetached >= 0 && r.Detached() != tc.wantDetached {
				t.Errorf("Remove detached %d restore processes, want %d", r.Detached(), tc.wantDetached)
			}
			if err := r.WatchProblems(); err != nil {
				t.Errorf("watch problems: %v", err)
			}
			if out := saveIn(t, nsName, tc.backend, IPv4); strings.Contains(out, ChainPrefix) {
				t.Errorf("rules left after Remove:\n%s", out)
			}
		})
	}
}

// A restore that fails is reported, also while its deletion is being watched: the
// chains stay, so the early return is never taken and the exit status decides. The
// fake fails after its first line, as a real restore stops at the failing line.
func TestRemoveFailingRestoreReportsError(t *testing.T) {
	testutil.RequirePrivileged(t, privilegedTools(BackendNFT)...)
	t.Parallel()
	nsName, nsPath := newPodNS(t)
	applyIn(t, nsPath, BackendNFT)
	r := NewRunner(BackendNFT)
	r.ReturnOnCommit = true
	r.SetTools(IPv4, fakeRestore(t, `read -r line; echo "forced failure" >&2; exit 1`))
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		_, err := r.Remove(context.Background(), v4Spec(), true)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "forced failure") {
		t.Fatalf("Remove with a failing restore = %v, want its error", err)
	}
	if r.Detached() != 0 {
		t.Errorf("a failing restore was detached as if committed")
	}
	// The fast delete failed, so Remove looked (iptables-save) and tried once more.
	if got := r.Counts(); got["iptables-nft-restore"] != 2 || got["iptables-nft-save"] != 1 {
		t.Errorf("Remove ran %v, want 2 restores and 1 save", got)
	}
	if out := saveIn(t, nsName, BackendNFT, IPv4); strings.Count(out, "-A "+att.Chain()) != 2 {
		t.Errorf("the rules should still be there after a failed removal:\n%s", out)
	}
}

// restore commits table by table: when the nat table's deletion commits and the
// filter table's fails (another rule still jumps to the chain), the chain is gone from
// nat only, which must not count as committed. Remove then removes the rest.
func TestRemovePartialCommitIsNotCommitted(t *testing.T) {
	testutil.RequirePrivileged(t, privilegedTools(BackendNFT)...)
	t.Parallel()
	nsName, nsPath := newPodNS(t)
	applyIn(t, nsPath, BackendNFT)
	if _, err := simnode.Run(context.Background(), "ip", "netns", "exec", nsName, "iptables-nft", "-A", "INPUT", "-j", att.Chain()); err != nil {
		t.Fatal(err)
	}
	r := NewRunner(BackendNFT)
	r.ReturnOnCommit = true
	var removed bool
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		removed, err = r.Remove(context.Background(), v4Spec(), true)
		return err
	})
	if err != nil || !removed {
		t.Fatalf("Remove = %v, %v; want true, nil", removed, err)
	}
	t.Logf("ran %s, detached %d", r.CountsString(), r.Detached())
	if got := r.Counts(); got["iptables-nft-restore"] != 2 || got["iptables-nft-save"] != 1 {
		t.Errorf("Remove ran %v, want the failing fast restore, a save and a second restore", got)
	}
	if out := saveIn(t, nsName, BackendNFT, IPv4); strings.Contains(out, ChainPrefix) {
		t.Errorf("rules left after Remove:\n%s", out)
	}
}
