package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestReplaceFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "conf")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	write := func(body string) func(*os.File) error {
		return func(f *os.File) error { _, err := f.WriteString(body); return err }
	}
	if err := ReplaceFile(path, ".conf-tmp-*", 0o640, write("new")); err != nil {
		t.Fatalf("ReplaceFile: %v", err)
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != "new" {
		t.Fatalf("content = %q, %v; want new", got, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode = %v, %v; want 0640", fi.Mode(), err)
	}
	// A failing write leaves the old file and no temporary file.
	boom := errors.New("boom")
	if err := ReplaceFile(path, ".conf-tmp-*", 0o640, func(*os.File) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("ReplaceFile with a failing write = %v, want boom", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("dir holds %v, %v; want only conf", entries, err)
	}
	if got, _ := os.ReadFile(path); string(got) != "new" {
		t.Fatalf("content after failed replace = %q, want new", got)
	}
}
