package state

import (
	"errors"
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
	if len(entries) != 1 || entries[0].Name() != "abc123-eth0.json" {
		t.Fatalf("dir holds %v, want exactly abc123-eth0.json", entries)
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
