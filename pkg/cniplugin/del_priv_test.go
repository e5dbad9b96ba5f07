package cniplugin

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/metaconceal/metaconceal/pkg/redirect"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// withRestore returns a runner hook that replaces the IPv4 restore program of the nft
// backend with a shell script named like it; $REAL in body is the real program.
func withRestore(t *testing.T, body string) func(*xtables.Runner) {
	t.Helper()
	tools, err := xtables.ToolsFor(xtables.BackendNFT, xtables.IPv4)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "iptables-nft-restore")
	if err := os.WriteFile(path, []byte("#!/bin/sh\nREAL="+tools.Restore+"\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tools.Restore = path
	return func(r *xtables.Runner) { r.SetTools(xtables.IPv4, tools) }
}

func runHooked(t *testing.T, verb func(*Plugin) func(*skel.CmdArgs) error, hook func(*xtables.Runner), a *skel.CmdArgs) (*Plugin, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	p := &Plugin{Stdout: &stdout, Stderr: &stderr, runnerHook: hook}
	err := verb(p)(a)
	t.Logf("plugin log: %s", strings.TrimSpace(stderr.String()))
	return p, err
}

// DEL returns only once its iptables-restore has exited: here the process lingers
// 300 ms after its commit, then leaves a mark that must be there when DEL returns.
// Still one process, and nothing of the attachment left nor its record.
func TestDelWaitsForRestore(t *testing.T) {
	e := newEnv(t, "nft")
	t.Parallel()
	podName, podPath := e.pod()
	a := args("c-wait", "eth0", podPath, e.conf(nil, "10.22.0.15/24"))
	if _, _, err := run(t, add, a); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	mark := filepath.Join(t.TempDir(), "exited")
	p, err := runHooked(t, del, withRestore(t, `"$REAL" "$@" || exit $?`+"\nsleep 0.3\n: >"+mark), a)
	if err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(mark); err != nil {
		t.Errorf("DEL returned before its iptables-restore exited: %v", err)
	}
	if p.lastRunner.Total() != 1 {
		t.Errorf("DEL ran %s, want one iptables-restore", p.lastRunner.CountsString())
	}
	if left := e.save(podName, xtables.IPv4); strings.Contains(left, redirect.ChainPrefix) {
		t.Errorf("rules left after DEL:\n%s", left)
	}
	if _, err := state.Read(e.stateDir, "c-wait", "eth0"); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("record after DEL: %v", err)
	}
}

// A DEL whose restore fails (after its first line, as a real one stops at the failing
// line) reports it, keeps the record for a retry, and leaves the rules: nothing is
// taken for removed that was not.
func TestDelFailingRestoreReportsError(t *testing.T) {
	e := newEnv(t, "nft")
	t.Parallel()
	podName, podPath := e.pod()
	a := args("c-fail", "eth0", podPath, e.conf(nil, "10.22.0.16/24"))
	if _, _, err := run(t, add, a); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	installed := e.save(podName, xtables.IPv4)
	_, err := runHooked(t, del, withRestore(t, `read -r line; echo "forced failure" >&2; exit 1`), a)
	var cniErr *types.Error
	if !errors.As(err, &cniErr) || cniErr.Code != types.ErrInternal || !strings.Contains(cniErr.Details, "forced failure") {
		t.Fatalf("DEL with a failing restore = %v, want a code-%d error carrying its message", err, types.ErrInternal)
	}
	if kept := e.save(podName, xtables.IPv4); ruleLines(kept) != ruleLines(installed) || !strings.Contains(kept, "-A "+chainOf("c-fail", "eth0")) {
		t.Errorf("rules should stay after a failed DEL:\n%s", kept)
	}
	if _, err := state.Read(e.stateDir, "c-fail", "eth0"); err != nil {
		t.Errorf("record gone after a failed DEL: %v", err)
	}
	if _, _, err := run(t, del, a); err != nil {
		t.Errorf("DEL retried with a working restore: %v", err)
	}
	if left := e.save(podName, xtables.IPv4); strings.Contains(left, redirect.ChainPrefix) {
		t.Errorf("rules left after the retried DEL:\n%s", left)
	}
}

// iptables-restore commits table by table: an ADD whose restore commits its first table
// and then fails leaves that table's chain behind unless ADD rolls back the failing
// family too. The script commits only up to the first COMMIT of any input that installs
// (holds a DNAT), then fails; removals pass through whole.
func TestAddRollsBackHalfCommittedFamily(t *testing.T) {
	e := newEnv(t, "nft")
	t.Parallel()
	podName, podPath := e.pod()
	a := args("c-half", "eth0", podPath, e.conf(nil, "10.22.0.16/24"))
	halfCommit := `in=$(mktemp); trap 'rm -f "$in"' EXIT; cat >"$in"
if grep -q -- '-j DNAT' "$in"; then
	sed '/^COMMIT/q' "$in" | "$REAL" "$@"
	exit 1
fi
"$REAL" "$@" <"$in"`
	if _, err := runHooked(t, add, withRestore(t, halfCommit), a); err == nil {
		t.Fatal("ADD with a half-committing restore succeeded")
	}
	if left := e.save(podName, xtables.IPv4); strings.Contains(left, redirect.ChainPrefix) {
		t.Errorf("half-committed rules left after the failed ADD:\n%s", left)
	}
	if _, err := state.Read(e.stateDir, "c-half", "eth0"); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("record after a failed ADD: %v", err)
	}
}

// ruleLines keeps the rule lines of iptables-save output (no comments, no counters).
func ruleLines(save string) string {
	var keep []string
	for _, l := range strings.Split(save, "\n") {
		if strings.HasPrefix(l, "-A ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}
