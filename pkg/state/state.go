// Package state holds the per-attachment records that the CNI plugin writes and the
// proxy reads: the one channel between the two (see DESIGN.md, "The state dir").
//
// A record is a small JSON file named <containerID>-<ifname>.json, written atomically
// (temp file in the same directory, fsync, rename) so a reader never sees half a record.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/metaconceal/metaconceal/internal/fsutil"
)

// DefaultDir is where plugin and proxy meet unless configured otherwise.
const DefaultDir = "/run/metaconceal"

const recordSuffix = ".json"

// Record describes one CNI attachment (container id + interface) that the plugin
// concealed the metadata server from.
type Record struct {
	// Network is the CNI network name (the conflist's "name"): GC of one network must
	// not collect another's attachments when both share a state dir.
	Network      string   `json:"network"`
	ContainerID  string   `json:"containerID"`
	IfName       string   `json:"ifName"`
	Netns        string   `json:"netns"`
	IPs          []string `json:"ips,omitempty"`
	PodNamespace string   `json:"podNamespace,omitempty"`
	PodName      string   `json:"podName,omitempty"`
	PodUID       string   `json:"podUID,omitempty"`
	// Exposed marks an attachment the plugin deliberately left unconcealed (mode
	// EXPOSED or an excluded namespace). The proxy serves such a pod in full when the
	// node-wide host guard sends its traffic there anyway; a pod without a record, or
	// with Exposed false, is concealed (fail closed).
	Exposed bool `json:"exposed,omitempty"`
	// ExposedReason says why, for logs: "mode EXPOSED" or "excludeNamespaces".
	ExposedReason string `json:"exposedReason,omitempty"`
}

// Key identifies an attachment the way CNI does.
func (r Record) Key() string { return Key(r.ContainerID, r.IfName) }

// Key is the attachment key and the record's file name without its suffix.
func Key(containerID, ifName string) string { return containerID + "-" + ifName }

// validateIDPart rejects values that could escape the state dir or collide with the
// naming scheme; container ids and interface names never contain these in practice.
func validateIDPart(name, value string) error {
	if value == "" {
		return fmt.Errorf("state: %s is empty", name)
	}
	if strings.ContainsAny(value, "/\\\x00") || value == "." || value == ".." {
		return fmt.Errorf("state: %s %q contains a path separator or is a dot name", name, value)
	}
	return nil
}

// Path returns the file a record for this attachment lives in.
func Path(dir, containerID, ifName string) (string, error) {
	if err := validateIDPart("container id", containerID); err != nil {
		return "", err
	}
	if err := validateIDPart("interface name", ifName); err != nil {
		return "", err
	}
	return filepath.Join(dir, Key(containerID, ifName)+recordSuffix), nil
}

// Write stores rec atomically, replacing an earlier record of the same attachment.
func Write(dir string, rec Record) error {
	path, err := Path(dir, rec.ContainerID, rec.IfName)
	if err != nil {
		return err
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("state: encode record %s: %w", rec.Key(), err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("state: create dir %s: %w", dir, err)
	}
	err = fsutil.ReplaceFile(path, ".tmp-"+rec.Key()+"-*", 0o644, func(tmp *os.File) error {
		_, err := tmp.Write(append(data, '\n'))
		return err
	})
	if err != nil {
		return fmt.Errorf("state: write record %s: %w", rec.Key(), err)
	}
	return nil
}

// ErrNotFound is returned by Read when no record exists for the attachment.
var ErrNotFound = errors.New("state: record not found")

// Read loads the record of one attachment. A missing record is ErrNotFound.
func Read(dir, containerID, ifName string) (Record, error) {
	path, err := Path(dir, containerID, ifName)
	if err != nil {
		return Record{}, err
	}
	return readFile(path)
}

func readFile(path string) (Record, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Record{}, fmt.Errorf("%w: %s", ErrNotFound, path)
	}
	if err != nil {
		return Record{}, fmt.Errorf("state: read %s: %w", path, err)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return Record{}, fmt.Errorf("state: decode %s: %w", path, err)
	}
	return rec, nil
}

// Remove deletes the record of one attachment. A record that is already gone is not
// an error, so that DEL stays idempotent.
func Remove(dir, containerID, ifName string) error {
	path, err := Path(dir, containerID, ifName)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state: remove %s: %w", path, err)
	}
	return nil
}

// List returns every record in dir. A missing dir holds no records. Files that cannot
// be decoded are reported in the returned error (joined) but do not hide the others.
func List(dir string) ([]Record, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state: list %s: %w", dir, err)
	}
	var (
		records []Record
		errs    []error
	)
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !strings.HasSuffix(name, recordSuffix) {
			continue
		}
		rec, err := readFile(filepath.Join(dir, name))
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				continue // removed between ReadDir and ReadFile by a concurrent DEL
			}
			errs = append(errs, err)
			continue
		}
		records = append(records, rec)
	}
	return records, errors.Join(errs...)
}
