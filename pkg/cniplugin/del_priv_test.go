package cniplugin

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"

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

// ADD returns only once its iptables-restore has exited: here the process lingers
// 300 ms after its commit, then leaves a mark that must be there when ADD returns.
// Still one process, and the attachment's rules and record in place.
func TestAddWaitsForRestore(t *testing.T) {
	e := newEnv(t, "nft")
	t.Parallel()
	podName, podPath := e.pod()
	a := args("c-wait", "eth0", podPath, e.conf(nil, "10.22.0.15/24"))
	mark := filepath.Join(t.TempDir(), "exited")
	p, err := runHooked(t, add, withRestore(t, `"$REAL" "$@" || exit $?`+"\nsleep 0.3\n: >"+mark), a)
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if _, err := os.Stat(mark); err != nil {
		t.Errorf("ADD returned before its iptables-restore exited: %v", err)
	}
	if p.lastRunner.Total() != 1 {
		t.Errorf("ADD ran %s, want one iptables-restore", p.lastRunner.CountsString())
	}
	if saved := e.save(podName, xtables.IPv4); strings.Count(saved, "-A "+chainOf("c-wait", "eth0")) != ipv4Rules {
		t.Errorf("want the attachment's %d rules after ADD:\n%s", ipv4Rules, saved)
	}
	if _, err := state.Read(e.stateDir, "c-wait", "eth0"); err != nil {
		t.Errorf("record after ADD: %v", err)
	}
}

// DEL starts no iptables process at all: with every program of both families replaced
// by a script that leaves a mark and fails, DEL still succeeds, removes the record,
// starts nothing (the runner counts nothing, the mark is absent) and leaves the rules
// to the netns, untouched.
func TestDelRunsNoIptables(t *testing.T) {
	e := newEnv(t, "nft")
	t.Parallel()
	podName, podPath := e.pod()
	a := args("c-noipt", "eth0", podPath, e.conf(map[string]any{"metadataAddresses": []string{"169.254.169.254", "fd20:ce::254"}},
		"10.22.0.16/24", "fd00:22::16/64"))
	if _, _, err := run(t, add, a); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	installed := e.save(podName, xtables.IPv4) + e.save(podName, xtables.IPv6)
	mark := filepath.Join(t.TempDir(), "ran")
	fail := filepath.Join(t.TempDir(), "fail")
	if err := os.WriteFile(fail, []byte("#!/bin/sh\n: >"+mark+"\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	hook := func(r *xtables.Runner) {
		for _, f := range []xtables.Family{xtables.IPv4, xtables.IPv6} {
			r.SetTools(f, xtables.Tools{Restore: fail, Save: fail, Iptables: fail})
		}
	}
	p, err := runHooked(t, del, hook, a)
	if err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if n := processes(p); n != 0 {
		t.Errorf("DEL started %d iptables process(es) (%s), want none", n, p.lastRunner.CountsString())
	}
	if _, err := os.Stat(mark); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("DEL ran an iptables program (mark: %v)", err)
	}
	if _, err := state.Read(e.stateDir, "c-noipt", "eth0"); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("record after DEL: %v", err)
	}
	if kept := e.save(podName, xtables.IPv4) + e.save(podName, xtables.IPv6); ruleLines(kept) != ruleLines(installed) ||
		!strings.Contains(kept, "-A "+chainOf("c-noipt", "eth0")) || !strings.Contains(kept, "fd20:ce::254") {
		t.Errorf("DEL changed the rules in the pod netns:\nbefore:\n%s\nafter:\n%s", installed, kept)
	}
}

// processes is how many iptables processes the plugin's last verb started; a verb that
// made no runner started none.
func processes(p *Plugin) int {
	if p.lastRunner == nil {
		return 0
	}
	return p.lastRunner.Total()
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
