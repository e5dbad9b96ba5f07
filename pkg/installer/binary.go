// Package installer puts the metaconceal plugin on a node and keeps it there: it copies
// the plugin binary into the CNI bin dir, keeps the plugin's entry in the node's primary
// CNI config while the main CNI rewrites its file, and takes both away on uninstall.
package installer

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/metaconceal/metaconceal/internal/fsutil"
)

// binaryMode is what CNI plugin binaries get: the runtime executes them as root.
const binaryMode = 0o755

// InstallBinary copies src to binDir/name unless a file with the same content is
// already there: temporary file in binDir, fsync, mode 0755, rename, fsync of the dir.
// A runtime that is executing the old binary keeps its inode; the next call gets the
// new one; nobody ever executes a half-written file.
func InstallBinary(src, binDir, name string) (changed bool, err error) {
	srcSum, err := fileSHA256(src)
	if err != nil {
		return false, fmt.Errorf("plugin binary: %w", err)
	}
	dst := filepath.Join(binDir, name)
	switch dstSum, err := fileSHA256(dst); {
	case err == nil && bytes.Equal(srcSum, dstSum):
		if err := ensureMode(dst); err != nil {
			return false, err
		}
		return false, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return false, fmt.Errorf("installed binary: %w", err)
	}
	in, err := os.Open(src)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", src, err)
	}
	defer in.Close()
	err = fsutil.ReplaceFile(dst, "."+name+".metaconceal-tmp-*", binaryMode, func(tmp *os.File) error {
		h := sha256.New()
		if _, err := io.Copy(io.MultiWriter(tmp, h), in); err != nil {
			return fmt.Errorf("copying %s to %s: %w", src, tmp.Name(), err)
		}
		if !bytes.Equal(h.Sum(nil), srcSum) {
			return fmt.Errorf("%s changed while being copied", src)
		}
		return nil
	})
	return err == nil, err
}

// ensureMode makes an identical binary executable again if someone changed its mode.
func ensureMode(path string) error {
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	if info.Mode().Perm() == binaryMode {
		return nil
	}
	if err := os.Chmod(path, binaryMode); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	return nil
}

// RemoveBinary deletes binDir/name; removed is false when it was not there.
func RemoveBinary(binDir, name string) (removed bool, err error) {
	path := filepath.Join(binDir, name)
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("removing %s: %w", path, err)
	}
	return true, fsutil.SyncDir(binDir)
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return h.Sum(nil), nil
}
