package nodegate

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// OpenedMarker is the file, in the plugin's state dir (a tmpfs: /run/metaconceal), that
// says the gate opened since the node booted. A reboot empties the dir; an agent that
// finds no marker starts with CloseAtStart.
const OpenedMarker = ".gate-opened"

// OpenedSinceBoot reports whether the marker is in dir.
func OpenedSinceBoot(dir string) (bool, error) {
	_, err := os.Stat(filepath.Join(dir, OpenedMarker))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("nodegate: %w", err)
	}
	return true, nil
}

// MarkOpened writes the marker in dir.
func MarkOpened(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, OpenedMarker), nil, 0o644); err != nil {
		return fmt.Errorf("nodegate: %w", err)
	}
	return nil
}

// RemoveMarker removes the marker from dir (uninstall) and reports whether it was there.
func RemoveMarker(dir string) (bool, error) {
	err := os.Remove(filepath.Join(dir, OpenedMarker))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("nodegate: %w", err)
	}
	return true, nil
}
