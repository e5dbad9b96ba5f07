// Package state holds the per-attachment records that the CNI plugin writes and the
// proxy reads: the one channel between the two (see docs/design.md, "The state dir").
//
// A record is a small JSON file named <containerID>:<ifname>.json, written atomically
// (temp file in the same directory, fsync, rename) so a reader never sees half a record.
// The separator ':' cannot occur in a Linux interface name, so the name is
// collision-free; records of earlier releases, named <containerID>-<ifname>.json, are
// still read, and replaced by the new name when the attachment is written again.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
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
	// HostIf is the attachment's host-side interface in the node netns (the bridge
	// plugin's host veth, a routed CNI's veth), from the main plugin's result; empty
	// when the result names none. The host guard lets traffic from the pod's IPs reach
	// the proxy only through it, so that an exposed pod's IP cannot be borrowed by a
	// spoofing pod; an exposed record without it is served as concealed under the
	// guard (fail closed).
	HostIf string `json:"hostIf,omitempty"`
	// Exposed marks an attachment the plugin deliberately left unconcealed (mode
	// EXPOSED or an excluded namespace). The proxy serves such a pod in full when the
	// node-wide host guard sends its traffic there anyway; a pod without a record, or
	// with Exposed false, is concealed (fail closed).
	Exposed bool `json:"exposed,omitempty"`
	// ExposedReason says why, for logs: "mode EXPOSED" or "excludeNamespaces".
	ExposedReason string `json:"exposedReason,omitempty"`
}

// Attachment names one CNI attachment and where it lives.
type Attachment struct {
	Network     string // the conflist's "name"
	ContainerID string
	IfName      string
	Netns       string
	HostIf      string // host-side interface, see Record.HostIf; may be empty
}

// PodRef names the pod of an attachment (K8S_POD_* from CNI_ARGS); empty outside
// Kubernetes.
type PodRef struct{ Namespace, Name, UID string }

// NewRecord is the one constructor of a Record: every writer builds its records here.
// ips are stored in their canonical text form (IPv4-mapped addresses unmapped), in
// the order given. A non-empty exposedReason marks the attachment as exposed.
func NewRecord(att Attachment, pod PodRef, ips []netip.Addr, exposedReason string) Record {
	rec := Record{
		Network: att.Network, ContainerID: att.ContainerID, IfName: att.IfName, Netns: att.Netns, HostIf: att.HostIf,
		PodNamespace: pod.Namespace, PodName: pod.Name, PodUID: pod.UID,
		Exposed: exposedReason != "", ExposedReason: exposedReason,
	}
	for _, a := range ips {
		rec.IPs = append(rec.IPs, a.Unmap().String())
	}
	return rec
}

// Equal reports whether r and o hold the same values in every field.
func (r Record) Equal(o Record) bool {
	return r.Network == o.Network && r.ContainerID == o.ContainerID && r.IfName == o.IfName && r.Netns == o.Netns &&
		slices.Equal(r.IPs, o.IPs) && r.PodNamespace == o.PodNamespace && r.PodName == o.PodName && r.PodUID == o.PodUID &&
		r.HostIf == o.HostIf && r.Exposed == o.Exposed && r.ExposedReason == o.ExposedReason
}

// Key identifies an attachment the way CNI does.
func (r Record) Key() string { return Key(r.ContainerID, r.IfName) }

// keySep separates container id and interface name in a key. Linux refuses ':' in
// interface names (and validateIDPart refuses it in ours), so splitting a key at its
// last ':' gives back both parts: no two attachments share a key.
const keySep = ":"

// Key is the attachment key and the record's file name without its suffix:
// <containerID>:<ifName>, readable in `ls`.
func Key(containerID, ifName string) string { return containerID + keySep + ifName }

// legacyKey is the file name (without suffix) of records written before keys became
// collision-free: `a-b`+`c` and `a`+`b-c` share it, so a legacy file is trusted only
// when its content names the attachment asked for.
func legacyKey(containerID, ifName string) string { return containerID + "-" + ifName }

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
	if strings.Contains(ifName, keySep) {
		return "", fmt.Errorf("state: interface name %q contains %q, which Linux refuses in interface names", ifName, keySep)
	}
	return filepath.Join(dir, Key(containerID, ifName)+recordSuffix), nil
}

func legacyPath(dir, containerID, ifName string) string {
	return filepath.Join(dir, legacyKey(containerID, ifName)+recordSuffix)
}

// readLegacy returns the record in the legacy-named file of this attachment, or
// ErrNotFound when there is none or it belongs to another attachment.
func readLegacy(dir, containerID, ifName string) (Record, error) {
	rec, err := readFile(legacyPath(dir, containerID, ifName))
	if err != nil {
		return Record{}, err
	}
	if rec.ContainerID != containerID || rec.IfName != ifName {
		return Record{}, fmt.Errorf("%w: %s holds %s", ErrNotFound, legacyPath(dir, containerID, ifName), rec.Key())
	}
	return rec, nil
}

// removeLegacy deletes the legacy-named file of this attachment, if it is this
// attachment's.
func removeLegacy(dir, containerID, ifName string) error {
	if _, err := readLegacy(dir, containerID, ifName); err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		return err
	}
	path := legacyPath(dir, containerID, ifName)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("state: remove %s: %w", path, err)
	}
	return nil
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
	// Migration: the record now lives under its new name only.
	return removeLegacy(dir, rec.ContainerID, rec.IfName)
}

// ErrNotFound is returned by Read when no record exists for the attachment.
var ErrNotFound = errors.New("state: record not found")

// Read loads the record of one attachment. A missing record is ErrNotFound.
func Read(dir, containerID, ifName string) (Record, error) {
	path, err := Path(dir, containerID, ifName)
	if err != nil {
		return Record{}, err
	}
	rec, err := readFile(path)
	if errors.Is(err, ErrNotFound) {
		if legacy, lerr := readLegacy(dir, containerID, ifName); !errors.Is(lerr, ErrNotFound) {
			return legacy, lerr
		}
	}
	return rec, err
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
	return removeLegacy(dir, containerID, ifName)
}

// List returns every record in dir, whatever its file's naming scheme. A missing dir
// holds no records. Files that cannot be decoded are reported in the returned error
// (joined) but do not hide the others. An attachment found under both names (a writer
// of this release and a reader of an older one racing) is listed once, from its
// new-named file.
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
		seen    = map[string]int{} // key -> index in records
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
		key := rec.Key()
		if i, dup := seen[key]; dup {
			if name == key+recordSuffix {
				records[i] = rec // the new-named file wins over a legacy one
			}
			continue
		}
		seen[key] = len(records)
		records = append(records, rec)
	}
	return records, errors.Join(errs...)
}

// ParseIP reads one of a record's IPs, written as an address or a prefix (earlier
// releases); the address is returned unmapped.
func ParseIP(s string) (netip.Addr, bool) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Addr{}, false
		}
		return p.Addr().Unmap(), true
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}
