// Package fsutil holds small file system helpers shared by the packages that write
// files atomically (temp file, fsync, rename).
package fsutil

import (
	"fmt"
	"os"
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
