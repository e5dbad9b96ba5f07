package installer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/metaconceal/metaconceal/pkg/conflist"
)

// Defaults of the watch loop.
const (
	DefaultDebounce = 250 * time.Millisecond
	DefaultResync   = time.Minute
	// pollInterval re-checks for a config while waiting, in case an event was missed.
	pollInterval = 5 * time.Second
	// fightWindow and fightCount: this many restores of the entry within the window
	// mean the main CNI keeps rewriting its file and the operator should know.
	fightWindow = time.Minute
	fightCount  = 5
)

// Options configure an Installer.
type Options struct {
	BinDir       string // CNI bin dir, e.g. /opt/cni/bin
	ConfDir      string // CNI conf dir, e.g. /etc/cni/net.d
	PluginBinary string // the plugin binary to copy
	Entry        conflist.Entry
	// Debounce is how long the conf dir must be quiet after an event before the config
	// is checked again, so that a CNI writing its file in several steps is seen once.
	Debounce time.Duration
	// Resync is how often the binary and the entry are checked without any event;
	// zero or less disables it.
	Resync time.Duration
	Log    *slog.Logger
}

// Installer installs, keeps and uninstalls the plugin on one node.
type Installer struct {
	opts     Options
	log      *slog.Logger
	restores []time.Time // when the watch loop had to put the entry back
	warned   time.Time
}

// New checks the options and returns an Installer.
func New(opts Options) (*Installer, error) {
	for flag, dir := range map[string]string{"CNI bin dir": opts.BinDir, "CNI conf dir": opts.ConfDir} {
		info, err := os.Stat(dir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		if !info.IsDir() {
			return nil, fmt.Errorf("%s %s is not a directory", flag, dir)
		}
	}
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Installer{opts: opts, log: log}, nil
}

// Once installs the binary, waits (watching the conf dir) until the node has a CNI
// config, and puts the entry into it. It fails when the config cannot take the entry.
func (in *Installer) Once(ctx context.Context) error {
	w, err := in.prepare(ctx)
	if err != nil {
		return err
	}
	defer w.Close()
	_, err = in.reconcileConfig(slog.LevelInfo)
	return err
}

// prepare starts watching the conf dir (before anything else, so no change is missed),
// installs the binary and waits until the node has a CNI config. On success the caller
// owns the watch.
func (in *Installer) prepare(ctx context.Context) (*fsnotify.Watcher, error) {
	w, err := in.watch()
	if err != nil {
		return nil, err
	}
	if err := in.installBinary(); err != nil {
		return nil, errors.Join(err, w.Close())
	}
	if err := in.waitForConfig(ctx, w); err != nil {
		return nil, errors.Join(err, w.Close())
	}
	return w, nil
}

// Run installs like Once, then keeps the entry in the primary config until ctx is done:
// whenever the conf dir changes (the main CNI rewrote its file, or another file became
// primary) and every Resync. A config it cannot patch is logged and waited out: the main
// CNI may fix it. With uninstallOnExit it uninstalls when ctx is done.
func (in *Installer) Run(ctx context.Context, uninstallOnExit bool) error {
	err := in.run(ctx)
	if uninstallOnExit && ctx.Err() != nil {
		in.log.Info("uninstalling on exit")
		return errors.Join(err, in.Uninstall())
	}
	return err
}

func (in *Installer) run(ctx context.Context) error {
	w, err := in.prepare(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped while waiting for a config
		}
		return err
	}
	defer w.Close()
	if _, err := in.reconcileConfig(slog.LevelInfo); err != nil {
		in.log.Error("cannot put the entry into the CNI config; waiting for it to change", "err", err)
	}

	var resync <-chan time.Time
	if in.opts.Resync > 0 {
		t := time.NewTicker(in.opts.Resync)
		defer t.Stop()
		resync = t.C
	}
	var debounce <-chan time.Time
	var pendingSince time.Time
	maxDelay := 10 * in.opts.Debounce
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("conf dir watch closed")
			}
			if ev.Name == filepath.Clean(in.opts.ConfDir) && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				return fmt.Errorf("CNI conf dir %s was removed", in.opts.ConfDir)
			}
			if !relevant(ev) {
				continue
			}
			in.log.Debug("conf dir event", "event", ev.String())
			// Each event pushes the check back by Debounce, up to maxDelay after the first.
			now := time.Now()
			if pendingSince.IsZero() {
				pendingSince = now
			}
			if now.Sub(pendingSince) < maxDelay {
				debounce = time.After(in.opts.Debounce)
			}
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("conf dir watch closed")
			}
			// An overflow means events were lost: check now rather than trust them.
			in.log.Warn("conf dir watch error; checking the config", "err", err)
			debounce = time.After(0)
		case <-debounce:
			debounce, pendingSince = nil, time.Time{}
			in.reconcileAfterChange()
		case <-resync:
			if err := in.installBinary(); err != nil {
				in.log.Error("cannot reinstall the plugin binary", "err", err)
			}
			in.reconcileAfterChange()
		}
	}
}

// relevant filters out what cannot change the runtime's view: our own temporary files
// and mode changes.
func relevant(ev fsnotify.Event) bool {
	if conflist.IsTempFile(ev.Name) {
		return false
	}
	return ev.Op&^fsnotify.Chmod != 0
}

// reconcileAfterChange puts the entry back if it went missing, and warns when the main
// CNI keeps taking it away. Our own writes trigger one more check that finds the entry
// unchanged and writes nothing, so there is no loop.
func (in *Installer) reconcileAfterChange() {
	ch, err := in.reconcileConfig(slog.LevelDebug)
	if err != nil {
		if errors.Is(err, conflist.ErrNoConfig) {
			in.log.Warn("no CNI config in the conf dir any more; waiting for one", "dir", in.opts.ConfDir)
			return
		}
		in.log.Error("cannot put the entry into the CNI config; waiting for it to change", "err", err)
		return
	}
	if ch.Action == conflist.Unchanged {
		return
	}
	now := time.Now()
	kept := in.restores[:0]
	for _, t := range in.restores {
		if now.Sub(t) < fightWindow {
			kept = append(kept, t)
		}
	}
	in.restores = append(kept, now)
	if len(in.restores) >= fightCount && now.Sub(in.warned) >= fightWindow {
		in.warned = now
		in.log.Warn("the main CNI keeps rewriting its config without the metaconceal entry; put the entry into that CNI's own config template instead (see docs)",
			"file", ch.Path, "restores", len(in.restores), "within", fightWindow)
	}
}

// reconcileConfig puts the entry into the primary config, under the conf dir lock.
// unchangedLevel is the log level of "already there".
func (in *Installer) reconcileConfig(unchangedLevel slog.Level) (conflist.Change, error) {
	unlock, err := lockDir(in.opts.ConfDir)
	if err != nil {
		return conflist.Change{}, err
	}
	defer unlock()
	ch, err := conflist.Install(in.opts.ConfDir, in.opts.Entry)
	if err != nil {
		return ch, err
	}
	level := slog.LevelInfo
	if ch.Action == conflist.Unchanged {
		level = unchangedLevel
	}
	attrs := []any{"file", ch.Path, "entry", ch.Action}
	if ch.Removed != "" {
		attrs = append(attrs, "removed", ch.Removed)
	}
	in.log.Log(context.Background(), level, "CNI config", attrs...)
	return ch, nil
}

// installBinary copies the binary under the conf dir lock, which every write of ours
// holds while its temporary file exists; so removeStaleTemps, under the same lock, only
// ever finds leftovers of a process that died mid-write.
func (in *Installer) installBinary() error {
	unlock, err := lockDir(in.opts.ConfDir)
	if err != nil {
		return err
	}
	defer unlock()
	in.removeStaleTemps()
	changed, err := InstallBinary(in.opts.PluginBinary, in.opts.BinDir, conflist.PluginType)
	if err != nil {
		return err
	}
	dst := filepath.Join(in.opts.BinDir, conflist.PluginType)
	if changed {
		in.log.Info("plugin binary installed", "from", in.opts.PluginBinary, "to", dst)
	} else {
		in.log.Debug("plugin binary already up to date", "path", dst)
	}
	return nil
}

// removeStaleTemps deletes temporary files a killed installer left in the bin and conf
// dirs. The runtime never loads them (their extension is not a config's), but they
// should not pile up on the node. Call with the conf dir lock held.
func (in *Installer) removeStaleTemps() {
	for _, dir := range []string{in.opts.ConfDir, in.opts.BinDir} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			in.log.Warn("cannot list for leftover temporary files", "dir", dir, "err", err)
			continue
		}
		for _, e := range entries {
			if e.IsDir() || !conflist.IsTempFile(e.Name()) {
				continue
			}
			path := filepath.Join(dir, e.Name())
			if err := os.Remove(path); err != nil {
				in.log.Warn("cannot remove leftover temporary file", "path", path, "err", err)
				continue
			}
			in.log.Info("removed leftover temporary file", "path", path)
		}
	}
}

// Uninstall removes the entry from every config in the conf dir, then the binary. When
// an entry cannot be removed the binary stays: a config naming a missing plugin would
// fail every pod on the node.
func (in *Installer) Uninstall() error {
	unlock, err := lockDir(in.opts.ConfDir)
	if err != nil {
		return err
	}
	defer unlock()
	changes, err := conflist.Uninstall(in.opts.ConfDir)
	for _, ch := range changes {
		attrs := []any{"file", ch.Path, "entry", ch.Action}
		if ch.Removed != "" {
			attrs = append(attrs, "removed", ch.Removed)
		}
		in.log.Info("CNI config", attrs...)
	}
	if len(changes) == 0 && err == nil {
		in.log.Info("no CNI config holds the metaconceal entry", "dir", in.opts.ConfDir)
	}
	if err != nil {
		return fmt.Errorf("removing the entry (plugin binary kept): %w", err)
	}
	removed, err := RemoveBinary(in.opts.BinDir, conflist.PluginType)
	if err != nil {
		return err
	}
	in.log.Info("plugin binary", "path", filepath.Join(in.opts.BinDir, conflist.PluginType), "removed", removed)
	return nil
}

func (in *Installer) watch() (*fsnotify.Watcher, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("creating conf dir watch: %w", err)
	}
	if err := w.Add(in.opts.ConfDir); err != nil {
		w.Close()
		return nil, fmt.Errorf("watching %s: %w", in.opts.ConfDir, err)
	}
	return w, nil
}

// waitForConfig returns once the conf dir holds a config. The watch is set up before
// the first look, so a config written in between is not missed.
func (in *Installer) waitForConfig(ctx context.Context, w *fsnotify.Watcher) error {
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	logged := false
	for {
		_, err := conflist.Primary(in.opts.ConfDir)
		if err == nil {
			return nil
		}
		if !errors.Is(err, conflist.ErrNoConfig) {
			return err
		}
		if !logged {
			in.log.Info("waiting for the main CNI to write its config", "dir", in.opts.ConfDir)
			logged = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for a CNI config in %s: %w", in.opts.ConfDir, ctx.Err())
		case _, ok := <-w.Events:
			if !ok {
				return errors.New("conf dir watch closed")
			}
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("conf dir watch closed")
			}
			in.log.Warn("conf dir watch error", "err", err)
		case <-poll.C:
		}
	}
}

// lockDir takes an exclusive flock on the directory itself, so that two installers on
// one node (an init container and the watcher, or old and new pods during an update)
// never interleave their read-modify-write of the same file. It adds no file.
func lockDir(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening %s to lock it: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	return func() { f.Close() }, nil // closing the last descriptor releases the lock
}
