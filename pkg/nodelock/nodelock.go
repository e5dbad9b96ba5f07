// Package nodelock keeps one node agent in charge per node. During a rolling update
// the old and the new DaemonSet pod run side by side; two agents would both keep the
// conflist entry (and, when their flags differ, put their own version back after the
// other's: flapping), both move the readiness taint and both repair the same pod. So
// the agent takes an exclusive flock(2) on a file in a host directory (the state dir)
// before it does anything, and holds it until it exits: the kernel releases it when the
// process ends, also on a crash or SIGKILL, so a lock is never left behind. The agent
// that waits takes over within a poll interval of the other one's exit.
package nodelock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// FileName is the lock file's name in the state dir (the DaemonSet's --lock-file).
const FileName = ".node-agent.lock"

// Remove deletes the lock file at path (uninstall); a missing one is not an error. It
// reports whether there was one.
func Remove(path string) (bool, error) {
	err := os.Remove(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("node agent lock: %w", err)
	}
	return true, nil
}

// PollInterval is how often a waiting agent tries the lock again.
const PollInterval = 250 * time.Millisecond

// Lock is a held lock; Release gives it back (so does the process's exit).
type Lock struct {
	f *os.File
}

// Acquire takes the exclusive lock on path (created when missing), waiting until the
// holder gives it up or ctx is done (then ctx's error). holder is written into the file
// for whoever looks (e.g. the pod name); the waiting is logged once, with what the
// holder wrote.
func Acquire(ctx context.Context, path, holder string, log *slog.Logger) (*Lock, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("node agent lock: %w", err)
	}
	waited := time.Time{}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("node agent lock %s: flock: %w", path, err)
		}
		if waited.IsZero() {
			waited = time.Now()
			other, _ := os.ReadFile(path)
			log.Info("another node agent holds the lock: waiting for it to exit", "lock", path, "holder", strings.TrimSpace(string(other)))
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(PollInterval):
		}
	}
	if !waited.IsZero() {
		log.Info("node agent lock taken over", "lock", path, "waited", time.Since(waited).Round(time.Millisecond).String())
	}
	if err := writeHolder(f, holder); err != nil {
		log.Warn("could not record the lock's holder", "lock", path, "err", err)
	}
	return &Lock{f: f}, nil
}

func writeHolder(f *os.File, holder string) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(fmt.Sprintf("%s pid=%d since=%s\n", holder, os.Getpid(), time.Now().UTC().Format(time.RFC3339))), 0)
	return err
}

// Release gives the lock back.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}
