package redirect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

// Backend names which iptables implementation to run: "auto" (what PATH resolves
// iptables-restore to, i.e. what the node uses), "nft" or "legacy".
type Backend string

const (
	BackendAuto   Backend = "auto"
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// Tools are the programs of one backend and family.
type Tools struct {
	Restore  string
	Save     string
	Iptables string
}

// fallbackDirs are searched when PATH does not hold a program: runtimes do not always
// pass a PATH to CNI plugins.
var fallbackDirs = []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"}

// ToolsFor resolves the programs of backend for family to absolute paths.
func ToolsFor(backend Backend, family Family) (Tools, error) {
	base := "iptables"
	if family == IPv6 {
		base = "ip6tables"
	}
	switch backend {
	case BackendAuto, "":
	case BackendNFT, BackendLegacy:
		base += "-" + string(backend)
	default:
		return Tools{}, fmt.Errorf("redirect: unknown iptables backend %q", backend)
	}
	var t Tools
	for _, p := range []struct {
		dst  *string
		name string
	}{{&t.Restore, base + "-restore"}, {&t.Save, base + "-save"}, {&t.Iptables, base}} {
		path, err := lookPath(p.name)
		if err != nil {
			return Tools{}, err
		}
		*p.dst = path
	}
	return t, nil
}

func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range fallbackDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("redirect: %s not found on PATH nor in %s", name, strings.Join(fallbackDirs, ", "))
}

// Runner runs the iptables programs of one backend and counts every process it
// starts, by program name: on a busy node each one costs several milliseconds, and
// the plugin logs the counts so that regressions show.
type Runner struct {
	Backend Backend
	// Wait is how long restore waits for the xtables lock (legacy backend).
	Wait time.Duration
	// ReturnOnCommit lets Remove return as soon as the kernel shows its deletion
	// committed, leaving iptables-nft-restore to exit on its own: the kernel makes
	// the release of its netlink socket wait an RCU grace period (commitwatch.go).
	// Only with an nf_tables iptables; DEL and GC set it.
	ReturnOnCommit bool

	mu            sync.Mutex
	tools         map[Family]Tools
	counts        map[string]int
	elapsed       time.Duration
	detached      int
	watchProblems []error
}

// NewRunner returns a Runner for backend with a 10 s lock wait.
func NewRunner(backend Backend) *Runner {
	return &Runner{Backend: backend, Wait: 10 * time.Second}
}

// Tools resolves (once) the programs for family.
func (r *Runner) Tools(family Family) (Tools, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t, ok := r.tools[family]; ok {
		return t, nil
	}
	t, err := ToolsFor(r.Backend, family)
	if err != nil {
		return Tools{}, err
	}
	if r.tools == nil {
		r.tools = map[Family]Tools{}
	}
	r.tools[family] = t
	return t, nil
}

// SetTools fixes the programs used for family instead of resolving them from the
// backend (tests use it to make one family fail).
func (r *Runner) SetTools(family Family, t Tools) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tools == nil {
		r.tools = map[Family]Tools{}
	}
	r.tools[family] = t
}

func (r *Runner) count(program string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts == nil {
		r.counts = map[string]int{}
	}
	r.counts[filepath.Base(program)]++
}

// Counts returns how many processes were started, by program name.
func (r *Runner) Counts() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.counts)
}

// Total returns how many processes were started.
func (r *Runner) Total() int {
	n := 0
	for _, c := range r.Counts() {
		n += c
	}
	return n
}

// CountsString renders Counts for a log line, sorted by name.
func (r *Runner) CountsString() string {
	counts := r.Counts()
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(counts)) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, counts[k]))
	}
	return strings.Join(parts, ",")
}

// Elapsed returns the wall time spent waiting for the processes Runner started
// itself (go-iptables calls in Check are not timed); for a deletion that returned on
// its commit, the time until the commit was seen.
func (r *Runner) Elapsed() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.elapsed
}

// Detached returns how many restore processes were left to finish on their own
// because their deletion was seen committed first (ReturnOnCommit).
func (r *Runner) Detached() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.detached
}

// WatchProblems returns why deletions could not be watched, if any: those waited for
// their process instead, which is slower but as correct.
func (r *Runner) WatchProblems() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return errors.Join(r.watchProblems...)
}

func (r *Runner) noteWatchProblem(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.watchProblems = append(r.watchProblems, err)
}

func (r *Runner) addElapsed(start time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.elapsed += time.Since(start)
}

func (r *Runner) exec(ctx context.Context, program, stdin string, args ...string) (string, error) {
	r.count(program)
	defer r.addElapsed(time.Now())
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, program, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), processError(program, args, err, &stderr)
	}
	return stdout.String(), nil
}

func processError(program string, args []string, err error, stderr *bytes.Buffer) error {
	return fmt.Errorf("%s %s: %w: %s", program, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
}

func (r *Runner) restoreArgs() []string {
	return []string{"--noflush", fmt.Sprintf("--wait=%d", max(int(r.Wait/time.Second), 1))}
}

func (r *Runner) restore(ctx context.Context, family Family, input string) error {
	t, err := r.Tools(family)
	if err != nil {
		return err
	}
	if _, err := r.exec(ctx, t.Restore, input, r.restoreArgs()...); err != nil {
		return fmt.Errorf("%w\ninput:\n%s", err, input)
	}
	return nil
}

// Snapshot runs iptables-save once and parses every table of family.
func (r *Runner) Snapshot(ctx context.Context, family Family) (Snapshot, error) {
	t, err := r.Tools(family)
	if err != nil {
		return Snapshot{}, err
	}
	out, err := r.exec(ctx, t.Save, "")
	if err != nil {
		return Snapshot{}, err
	}
	return ParseSave(out)
}

// Apply installs spec in the current netns, atomically: one iptables-restore. When
// mayExist is false (no state record for the attachment) the chains are created with
// -N in a single process; if that fails because they exist after all, or when mayExist
// is true, Apply takes a snapshot and rewrites the attachment's rules to exactly spec
// (one iptables-save, one iptables-restore), so ADD twice leaves one set of rules.
func (r *Runner) Apply(ctx context.Context, spec Spec, mayExist bool) error {
	tables, err := Render(spec)
	if err != nil {
		return err
	}
	chain := spec.Attachment.Chain()
	var fastErr error
	if !mayExist {
		if fastErr = r.restore(ctx, spec.Family, AddRestore(tables, chain)); fastErr == nil {
			return nil
		}
	}
	snap, err := r.Snapshot(ctx, spec.Family)
	if err != nil {
		return errors.Join(fastErr, err)
	}
	if err := r.restore(ctx, spec.Family, ReconcileRestore(tables, chain, snap)); err != nil {
		return errors.Join(fastErr, err)
	}
	return nil
}

// Remove deletes the attachment's jumps and chains of spec's family from the current
// netns. When likelyPresent (the state record exists) it first tries one restore that
// deletes exactly what Apply made; otherwise, or when that fails, it takes a snapshot
// and removes whatever of the attachment is there. It reports whether anything was
// there to remove; nothing there is not an error.
func (r *Runner) Remove(ctx context.Context, spec Spec, likelyPresent bool) (bool, error) {
	chain := spec.Attachment.Chain()
	var fastErr error
	if likelyPresent {
		tables, err := Render(spec)
		if err != nil {
			return false, err
		}
		names := make([]string, len(tables))
		for i, t := range tables {
			names[i] = t.Table
		}
		if fastErr = r.restoreRemoval(ctx, spec.Family, chain, names, DeleteRestore(tables, chain)); fastErr == nil {
			return true, nil
		}
	}
	snap, err := r.Snapshot(ctx, spec.Family)
	if err != nil {
		return false, errors.Join(fastErr, err)
	}
	input := RemovalRestore(chain, snap)
	if input == "" {
		return false, nil
	}
	// Watchable only when every table the input touches holds the chain itself.
	watched := snap.TablesWith(chain)
	if slices.ContainsFunc(watched, func(table string) bool { return !snap.HasChain(table, chain) }) {
		watched = nil
	}
	if err := r.restoreRemoval(ctx, spec.Family, chain, watched, input); err != nil {
		return false, errors.Join(fastErr, err)
	}
	return true, nil
}

// Check verifies, through go-iptables, that spec is installed in the current netns:
// each table's chain holds exactly the rendered rules, in order, and OUTPUT jumps to
// it. The error names what is missing or differs.
func (r *Runner) Check(spec Spec) error {
	tables, err := Render(spec)
	if err != nil {
		return err
	}
	t, err := r.Tools(spec.Family)
	if err != nil {
		return err
	}
	proto := iptables.ProtocolIPv4
	if spec.Family == IPv6 {
		proto = iptables.ProtocolIPv6
	}
	r.count(t.Iptables) // go-iptables runs "iptables --version" in New
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(t.Iptables), iptables.Timeout(int(max(r.Wait/time.Second, 1))))
	if err != nil {
		return fmt.Errorf("redirect: %s: %w", t.Iptables, err)
	}
	chain := spec.Attachment.Chain()
	var problems []string
	for _, tr := range tables {
		r.count(t.Iptables)
		got, err := ipt.List(tr.Table, chain)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s table: chain %s of attachment %s is missing (%v)", tr.Table, chain, spec.Attachment, err))
			continue
		}
		// iptables-nft warns with a "#" line when legacy tables exist too.
		got = slices.DeleteFunc(got, func(l string) bool { return strings.HasPrefix(l, "#") })
		want := []string{"-N " + chain}
		for _, rule := range tr.Chain {
			want = append(want, "-A "+chain+" "+rule.String())
		}
		if !slices.Equal(got, want) {
			problems = append(problems, fmt.Sprintf("%s table: chain %s differs:\n  want %q\n  got  %q", tr.Table, chain, want, got))
		}
		r.count(t.Iptables)
		ok, err := ipt.Exists(tr.Table, "OUTPUT", tr.Jump...)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s table: checking the OUTPUT jump to %s: %v", tr.Table, chain, err))
		case !ok:
			problems = append(problems, fmt.Sprintf("%s table: OUTPUT has no rule %q", tr.Table, "-A OUTPUT "+tr.Jump.String()))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("redirect: %s rules of attachment %s: %s", spec.Family, spec.Attachment, strings.Join(problems, "; "))
	}
	return nil
}
