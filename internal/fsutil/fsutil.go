// Package fsutil holds the atomic file replacement (temp file, fsync, rename) shared
// by the state records, the conflist patcher and the binary installer.
package fsutil

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// SyncDir fsyncs a directory, so that a rename into it survives a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// ReplaceFile replaces path atomically: write fills a temporary file created in the
// same directory from tempPattern (os.CreateTemp syntax), which then gets mode, is
// fsynced, renamed over path, and the directory fsynced. A reader sees the old file or
// the new one, never a part of either; on error the temporary file is removed.
func ReplaceFile(path, tempPattern string, mode fs.FileMode, write func(*os.File) error) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return fmt.Errorf("creating temporary file for %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()           // the error being returned says what went wrong
			os.Remove(tmp.Name()) // best effort, as above
		}
	}()
	if err = write(tmp); err != nil {
		return err
	}
	if err = tmp.Chmod(mode); err != nil { // after write, whose chown may clear set-id bits
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp.Name(), err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmp.Name(), err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("renaming %s to %s: %w", tmp.Name(), path, err)
	}
	return SyncDir(dir)
}
