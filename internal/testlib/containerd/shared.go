package containerd

// What every containerd a test starts shares with the others on this machine, and how
// they share it. Each runtime has its own root, state, socket, runc root and netns bind
// mounts (Config), but some places are the machine's: the k8s.io cgroup parents (the
// CRI puts a sandbox whose config names no cgroup parent, as the kubelet sends with
// cgroupsPerQOS off, under /<namespace>/<id>), /run/containerd (the shims' sockets),
// /var/lib/cni (libcni's result cache). Two runtimes alive at once (go test runs the
// packages test/e2e and test/e2e/nodeagent side by side) must not remove those under
// each other: the first to stop used to rmdir the k8s.io parents while the other's
// containers lived below them (EBUSY, reported as a failure).
//
// A Lease is one runtime's claim on them, registered in one small record under a file
// lock: the record lists the live holders and the k8s.io parents that a test runtime
// found missing (so created). Releasing the last lease removes those parents and the
// shared directories when empty; any other release removes nothing shared. A holder
// that died without releasing (a killed test binary) is recognised by its pid and
// process start time and dropped from the record by the next acquire or release.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"
)

var (
	// leaseLockPath serialises every change of the record (kept in /run/lock, as the
	// cluster e2e's own lock).
	leaseLockPath = "/run/lock/metaconceal-test-runtimes.lock"
	// leaseRecordPath is the record; the last release removes it.
	leaseRecordPath = "/run/metaconceal-test-runtimes.json"
)

// sharedDirs are the machine's directories containerd, its shims and libcni create
// and that no runtime of ours owns: removed, when empty, by the last release only.
var sharedDirs = []string{"/run/containerd/runc/k8s.io", "/run/containerd/runc", "/run/containerd/s", "/run/containerd", "/var/lib/cni/results", "/var/lib/cni"}

type leaseHolder struct {
	ID    string `json:"id"`
	PID   int    `json:"pid"`
	Start string `json:"start"` // the process's start time (/proc/<pid>/stat field 22)
}

type leaseRecord struct {
	Holders []leaseHolder `json:"holders"`
	// Created are the k8s.io cgroup parents that were missing when a holder
	// acquired: test runtimes created them, the last release removes them.
	Created []string `json:"created"`
}

// Lease is one runtime's registration; Release it once the runtime and everything it
// ran are gone.
type Lease struct {
	holder   leaseHolder
	released bool
}

// AcquireLease registers a runtime about to start. Call it before starting containerd,
// which creates the k8s.io parents with its first sandbox.
func AcquireLease(id string) (*Lease, error) {
	start, err := processStart(os.Getpid())
	if err != nil {
		return nil, err
	}
	l := &Lease{holder: leaseHolder{ID: id, PID: os.Getpid(), Start: start}}
	err = withLeaseRecord(func(rec *leaseRecord) {
		for _, p := range MissingK8sCgroups() {
			if !slices.Contains(rec.Created, p) {
				rec.Created = append(rec.Created, p)
			}
		}
		rec.Holders = append(rec.Holders, l.holder)
	})
	if err != nil {
		return nil, fmt.Errorf("register test runtime %s: %w", id, err)
	}
	return l, nil
}

// Release unregisters the runtime. When no other live runtime holds a lease, it
// removes the k8s.io parents test runtimes created and the shared directories that
// are empty; a parent still busy then is in use by something that is not a test
// runtime of ours (a containerd of the machine started meanwhile), and is kept, said
// in the returned errors. Release twice is a no-op.
func (l *Lease) Release() []error {
	if l == nil || l.released {
		return nil
	}
	l.released = true
	var errs []error
	err := withLeaseRecord(func(rec *leaseRecord) {
		rec.Holders = slices.DeleteFunc(rec.Holders, func(h leaseHolder) bool { return h == l.holder })
		if len(rec.Holders) > 0 {
			return
		}
		for _, p := range rec.Created {
			if err := rmdirRetry(p); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s (no test runtime left): %w", p, err))
			}
		}
		rec.Created = nil
		for _, d := range sharedDirs {
			_ = syscall.Rmdir(d) // only when empty: a containerd of the machine may use them
		}
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("unregister test runtime %s: %w", l.holder.ID, err))
	}
	return errs
}

// rmdirRetry removes an empty cgroup dir, allowing the kernel a moment to release a
// cgroup whose last process was just killed.
func rmdirRetry(p string) error {
	var err error
	for try := 0; try < 10; try++ {
		if err = syscall.Rmdir(p); err == nil || !errors.Is(err, syscall.EBUSY) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// withLeaseRecord runs change on the record under the file lock, dropping holders
// that are no longer running first, then writes the record back (removes it when it
// holds nothing).
func withLeaseRecord(change func(*leaseRecord)) error {
	if err := os.MkdirAll(filepath.Dir(leaseLockPath), 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(leaseLockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", leaseLockPath, err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // closing unlocks too

	var rec leaseRecord
	data, err := os.ReadFile(leaseRecordPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return err
	default:
		if err := json.Unmarshal(data, &rec); err != nil {
			return fmt.Errorf("%s: %w", leaseRecordPath, err)
		}
	}
	rec.Holders = slices.DeleteFunc(rec.Holders, func(h leaseHolder) bool {
		start, err := processStart(h.PID)
		return err != nil || start != h.Start
	})
	change(&rec)
	if len(rec.Holders) == 0 && len(rec.Created) == 0 {
		if err := os.Remove(leaseRecordPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	out, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := leaseRecordPath + ".tmp"
	if err := os.WriteFile(tmp, out, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, leaseRecordPath)
}

// processStart is a process's start time in clock ticks since boot (field 22 of
// /proc/<pid>/stat): with the pid, it names one process even when pids are reused.
func processStart(pid int) (string, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", err
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses; the fields
	// after it start at field 3.
	fields := bytes.Fields(data[bytes.LastIndexByte(data, ')')+1:])
	if len(fields) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: %d fields after comm", pid, len(fields))
	}
	return string(fields[19]), nil
}
