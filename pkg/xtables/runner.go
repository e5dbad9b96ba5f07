package xtables

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

// DefaultWait is how long NewRunner's processes wait for the xtables lock.
const DefaultWait = 10 * time.Second

// Runner runs the iptables programs of one backend and counts every process it
// starts, by program name: on a busy node each one costs several milliseconds, and
// the CNI plugin logs the counts so that regressions show. Every process a Runner
// starts has exited, and been waited for, when the call that started it returns.
// A Runner is safe for concurrent use.
type Runner struct {
	Backend Backend
	// Wait is how long a process waits for the xtables lock (the legacy backend's
	// /run/xtables.lock; nf_tables ignores it): at least a second when positive
	// (--wait=N), and as long as the context allows when 0 (--wait).
	Wait time.Duration

	mu      sync.Mutex
	tools   map[Family]Tools
	counts  map[string]int
	elapsed time.Duration
}

// NewRunner returns a Runner for backend that waits DefaultWait for the xtables lock.
func NewRunner(backend Backend) *Runner {
	return &Runner{Backend: backend, Wait: DefaultWait}
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

// Started counts a process of program that someone else started for this Runner's
// caller (go-iptables queries through the handle IPTables returns).
func (r *Runner) Started(program string) {
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

// Elapsed returns the wall time spent waiting for the processes the Runner started
// itself (go-iptables queries are not timed).
func (r *Runner) Elapsed() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.elapsed
}

func (r *Runner) addElapsed(start time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.elapsed += time.Since(start)
}

// run runs program to completion with stdin as its input and returns its output.
func (r *Runner) run(ctx context.Context, program, stdin string, args ...string) (string, error) {
	r.Started(program)
	defer r.addElapsed(time.Now())
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, program, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", program, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// waitArg is the xtables lock option of iptables-restore.
func (r *Runner) waitArg() string {
	if r.Wait <= 0 {
		return "--wait"
	}
	return fmt.Sprintf("--wait=%d", max(int(r.Wait/time.Second), 1))
}

// Restore runs family's iptables-restore --noflush once with input: each table's
// block (*table ... COMMIT) is one atomic transaction. The error carries the program's
// message and the input.
func (r *Runner) Restore(ctx context.Context, family Family, input string) error {
	t, err := r.Tools(family)
	if err != nil {
		return err
	}
	if _, err := r.run(ctx, t.Restore, input, "--noflush", r.waitArg()); err != nil {
		return fmt.Errorf("%w\ninput:\n%s", err, input)
	}
	return nil
}

// Snapshot runs family's iptables-save once and parses every table.
func (r *Runner) Snapshot(ctx context.Context, family Family) (Snapshot, error) {
	t, err := r.Tools(family)
	if err != nil {
		return Snapshot{}, err
	}
	out, err := r.run(ctx, t.Save, "")
	if err != nil {
		return Snapshot{}, err
	}
	return ParseSave(out)
}

// IPTables returns a go-iptables handle on family's iptables program, with the same
// xtables lock wait. Creating it runs "iptables --version", which is counted; callers
// count their queries with Started.
func (r *Runner) IPTables(family Family) (*iptables.IPTables, error) {
	t, err := r.Tools(family)
	if err != nil {
		return nil, err
	}
	r.Started(t.Iptables)
	var ipt *iptables.IPTables
	if r.Wait > 0 {
		ipt, err = iptables.New(iptables.IPFamily(family.Protocol()), iptables.Path(t.Iptables), iptables.Timeout(int(max(r.Wait/time.Second, 1))))
	} else { // go-iptables' default: --wait, as long as it takes
		ipt, err = iptables.New(iptables.IPFamily(family.Protocol()), iptables.Path(t.Iptables))
	}
	if err != nil {
		return nil, fmt.Errorf("xtables: %s: %w", t.Iptables, err)
	}
	return ipt, nil
}
