package checksums

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(t *testing.T, dir string)
		want   string // "" = passes
	}{
		{"untouched", func(t *testing.T, dir string) {}, ""},
		{"changed byte", func(t *testing.T, dir string) { write(t, dir, "a/b.json", "{\"x\":2}") }, "a/b.json: sha256"},
		{"unlisted file", func(t *testing.T, dir string) { write(t, dir, "c", "new") }, "c is not listed"},
		{"missing file", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "a/b.json")) }, "a/b.json, which is missing"},
		{"malformed list", func(t *testing.T, dir string) { write(t, dir, File, "zz  a\n") }, "malformed"},
		{"path escapes", func(t *testing.T, dir string) { write(t, dir, File, strings.Repeat("0", 64)+"  ../x\n") }, "malformed"},
		{"signature not listed", func(t *testing.T, dir string) { write(t, dir, Signature, "sig") }, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, dir, "a/b.json", "{\"x\":1}")
			write(t, dir, "top", "top")
			if err := Write(dir); err != nil {
				t.Fatal(err)
			}
			c.change(t, dir)
			_, err := Check(dir)
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("Check: %v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("Check: %v, want an error with %q", err, c.want)
			}
		})
	}
}

func write(t *testing.T, dir, rel, content string) {
	t.Helper()
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
