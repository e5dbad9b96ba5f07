package state

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestWriteReadRemove(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state") // not yet created: Write must create it
	rec := Record{
		ContainerID: "abc123", IfName: "eth0", Netns: "/var/run/netns/p1",
		IPs: []string{"10.22.0.5", "fd00::5"}, PodNamespace: "default", PodName: "web", PodUID: "u-1",
	}
	if err := Write(dir, rec); err != nil {
		t.Fatalf("Write: %v", err)
	}
	got, err := Read(dir, "abc123", "eth0")
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if !reflect.DeepEqual(got, rec) {
		t.Fatalf("Read = %+v, want %+v", got, rec)
	}
	// Overwrite replaces the record and leaves no temp file behind.
	rec.IPs = []string{"10.22.0.6"}
	if err := Write(dir, rec); err != nil {
		t.Fatalf("second Write: %v", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "abc123:eth0.json" {
		t.Fatalf("dir holds %v, want exactly abc123:eth0.json", entries)
	}
	if err := Remove(dir, "abc123", "eth0"); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if err := Remove(dir, "abc123", "eth0"); err != nil {
		t.Fatalf("second Remove must be a no-op, got %v", err)
	}
	if _, err := Read(dir, "abc123", "eth0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Read after Remove: err = %v, want ErrNotFound", err)
	}
}

func TestPathRejectsEscapes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ id, ifName string }{
		{"", "eth0"}, {"abc", ""}, {"../x", "eth0"}, {"abc", "a/b"}, {"..", "eth0"}, {"a\\b", "eth0"}, {"a\x00", "eth0"},
		{"abc", "eth:0"},
	} {
		if _, err := Path("/run/x", tc.id, tc.ifName); err == nil {
			t.Errorf("Path(%q, %q) accepted a bad name", tc.id, tc.ifName)
		}
		if err := Write(t.TempDir(), Record{ContainerID: tc.id, IfName: tc.ifName}); err == nil {
			t.Errorf("Write(%q, %q) accepted a bad name", tc.id, tc.ifName)
		}
	}
}

func TestList(t *testing.T) {
	t.Parallel()
	if recs, err := List(filepath.Join(t.TempDir(), "missing")); err != nil || recs != nil {
		t.Fatalf("List of a missing dir = %v, %v; want nil, nil", recs, err)
	}
	dir := t.TempDir()
	for _, id := range []string{"a", "b"} {
		if err := Write(dir, Record{ContainerID: id, IfName: "eth0"}); err != nil {
			t.Fatal(err)
		}
	}
	// A temp file of a write in progress and an unrelated file are ignored; a corrupt
	// record is reported without hiding the good ones.
	for name, body := range map[string]string{".tmp-x-eth0-1": "{", "notes.txt": "hi", "bad-eth0.json": "{"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	recs, err := List(dir)
	if err == nil {
		t.Fatal("List must report the corrupt record")
	}
	if len(recs) != 2 || recs[0].ContainerID != "a" || recs[1].ContainerID != "b" {
		t.Fatalf("List = %+v, want records a and b", recs)
	}
}

func TestKeysDoNotCollide(t *testing.T) {
	t.Parallel()
	// With "-" as the separator both attachments were "a-b-c".
	dir := t.TempDir()
	one := Record{ContainerID: "a-b", IfName: "c", PodName: "one"}
	two := Record{ContainerID: "a", IfName: "b-c", PodName: "two"}
	for _, r := range []Record{one, two} {
		if err := Write(dir, r); err != nil {
			t.Fatal(err)
		}
	}
	if one.Key() == two.Key() {
		t.Fatalf("keys collide: %q", one.Key())
	}
	for _, want := range []Record{one, two} {
		got, err := Read(dir, want.ContainerID, want.IfName)
		if err != nil || got.PodName != want.PodName {
			t.Errorf("Read(%q, %q) = %+v, %v; want pod %q", want.ContainerID, want.IfName, got, err, want.PodName)
		}
	}
	if recs, err := List(dir); err != nil || len(recs) != 2 {
		t.Errorf("List = %+v, %v; want both records", recs, err)
	}
}

// writeLegacy puts a record where the previous release wrote it.
func writeLegacy(t *testing.T, dir string, rec Record) string {
	t.Helper()
	data, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, rec.ContainerID+"-"+rec.IfName+".json")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLegacyRecords(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	old := Record{Network: "n", ContainerID: "c1", IfName: "eth0", IPs: []string{"10.0.0.1"}, PodName: "old"}
	legacy := writeLegacy(t, dir, old)

	// A node upgraded in place: the old record is read, listed and removed.
	if got, err := Read(dir, "c1", "eth0"); err != nil || !got.Equal(old) {
		t.Fatalf("Read of a legacy record = %+v, %v", got, err)
	}
	if recs, err := List(dir); err != nil || len(recs) != 1 || !recs[0].Equal(old) {
		t.Fatalf("List with a legacy record = %+v, %v", recs, err)
	}
	// Rewriting migrates it: one file, the new name.
	rewritten := old
	rewritten.PodName = "new"
	if err := Write(dir, rewritten); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(legacy); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("legacy file still there after a rewrite: %v", err)
	}
	if recs, err := List(dir); err != nil || len(recs) != 1 || recs[0].PodName != "new" {
		t.Fatalf("List after migration = %+v, %v", recs, err)
	}
	if err := Remove(dir, "c1", "eth0"); err != nil {
		t.Fatal(err)
	}

	// Remove takes a legacy record away too.
	writeLegacy(t, dir, old)
	if err := Remove(dir, "c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "c1", "eth0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Read after Remove of a legacy record: %v", err)
	}

	// A legacy file whose name collides belongs to the attachment its content names:
	// a-b + c is not a + b-c.
	other := Record{ContainerID: "a", IfName: "b-c", PodName: "other"}
	otherPath := writeLegacy(t, dir, other)
	if _, err := Read(dir, "a-b", "c"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Read(a-b, c) of a legacy file holding a + b-c: err = %v, want ErrNotFound", err)
	}
	if err := Remove(dir, "a-b", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(otherPath); err != nil {
		t.Errorf("Remove(a-b, c) deleted the legacy record of a + b-c: %v", err)
	}
	if got, err := Read(dir, "a", "b-c"); err != nil || got.PodName != "other" {
		t.Errorf("Read(a, b-c) = %+v, %v", got, err)
	}
}

func TestNewRecord(t *testing.T) {
	t.Parallel()
	att := Attachment{Network: "n", ContainerID: "c", IfName: "eth0", Netns: "/x", HostIf: "veth1"}
	pod := PodRef{Namespace: "ns", Name: "p", UID: "u"}
	ips := []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fd00::1")}
	for _, tc := range []struct {
		reason string
		want   Record
	}{
		{"", Record{Network: "n", ContainerID: "c", IfName: "eth0", Netns: "/x", HostIf: "veth1", IPs: []string{"10.0.0.1", "fd00::1"},
			PodNamespace: "ns", PodName: "p", PodUID: "u"}},
		{"excludeNamespaces", Record{Network: "n", ContainerID: "c", IfName: "eth0", Netns: "/x", HostIf: "veth1", IPs: []string{"10.0.0.1", "fd00::1"},
			PodNamespace: "ns", PodName: "p", PodUID: "u", Exposed: true, ExposedReason: "excludeNamespaces"}},
	} {
		if got := NewRecord(att, pod, ips, tc.reason); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("NewRecord(reason %q) = %+v, want %+v", tc.reason, got, tc.want)
		}
	}
}

// TestEqualCoversEveryField changes each field of a record in turn: Equal must notice
// every one, so that a field added later cannot be forgotten there.
func TestEqualCoversEveryField(t *testing.T) {
	t.Parallel()
	base := Record{IPs: []string{"10.0.0.1"}}
	if !base.Equal(base) {
		t.Fatal("a record is not Equal to itself")
	}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		changed := base
		changed.IPs = append([]string(nil), base.IPs...)
		f := reflect.ValueOf(&changed).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Slice:
			f.Set(reflect.ValueOf([]string{"10.0.0.2"}))
		default:
			t.Fatalf("field %s has kind %s: extend this test", typ.Field(i).Name, f.Kind())
		}
		if base.Equal(changed) || changed.Equal(base) {
			t.Errorf("Equal ignores field %s", typ.Field(i).Name)
		}
	}
}
