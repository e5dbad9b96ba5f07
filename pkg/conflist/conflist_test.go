package conflist

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var entry = Entry{Mode: "SECURE", Proxy: "169.254.169.252:988"}

func TestInsertEdits(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		in     string
		want   string
		action Action
	}{
		{
			name:   "compact list gets a compact entry",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"}]}`,
			action: Added,
		},
		{
			name:   "spaces kept",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins": [ {"type":"bridge"} ] }`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins": [ {"type":"bridge"}, {"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"} ] }`,
			action: Added,
		},
		{
			name:   "old entry replaced where it stands",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"EXPOSED"},{"type":"portmap"}]}`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"},{"type":"portmap"}]}`,
			action: Replaced,
		},
		{
			name:   "same settings in another key order are unchanged",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{ "proxy":"169.254.169.252:988", "type":"metaconceal","mode":"SECURE"}]}`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{ "proxy":"169.254.169.252:988", "type":"metaconceal","mode":"SECURE"}]}`,
			action: Unchanged,
		},
		{
			name:   "duplicates collapse to the first",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"},{"type":"portmap"},{"type":"metaconceal"}]}`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"},{"type":"portmap"}]}`,
			action: Replaced,
		},
		{
			name:   "first position cannot chain: moved to the end",
			in:     `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"metaconceal"},{"type":"bridge"}]}`,
			want:   `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE","proxy":"169.254.169.252:988"}]}`,
			action: Replaced,
		},
		{
			name:   "unknown top-level and plugin fields untouched",
			in:     "{\"x-vendor\":{\"b\":1,\"a\":[1e3,2.50]},\"cniVersion\":\"0.4.0\",\"name\":\"n\",\"plugins\":[{\"type\":\"bridge\",\"z\":\"\\u00e9\"}],\"disableCheck\":true}\n",
			want:   "{\"x-vendor\":{\"b\":1,\"a\":[1e3,2.50]},\"cniVersion\":\"0.4.0\",\"name\":\"n\",\"plugins\":[{\"type\":\"bridge\",\"z\":\"\\u00e9\"},{\"type\":\"metaconceal\",\"mode\":\"SECURE\",\"proxy\":\"169.254.169.252:988\"}],\"disableCheck\":true}\n",
			action: Added,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, action, err := Insert([]byte(tc.in), entry)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want || action != tc.action {
				t.Errorf("Insert:\n got %s (%s)\nwant %s (%s)", got, action, tc.want, tc.action)
			}
			again, action, err := Insert(got, entry)
			if err != nil || action != Unchanged || !bytes.Equal(again, got) {
				t.Errorf("second Insert: %s (%s, %v); want unchanged", again, action, err)
			}
			if tc.action == Added {
				back, action, err := Remove(got)
				if err != nil || action != Removed || string(back) != tc.in {
					t.Errorf("Remove: %q (%s, %v); want %q", back, action, err, tc.in)
				}
			}
		})
	}
}

func TestInsertRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, in, wantErr string
	}{
		{"bad JSON", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},]}`, "not valid JSON at byte offset"},
		{"trailing garbage", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]} x`, "not valid JSON"},
		{"empty file", ``, "not valid JSON"},
		{"not an object", `[{"type":"bridge"}]`, "could not load"},
		{"no plugins key", `{"name":"n","cniVersion":"1.1.0"}`, `no "plugins" list`},
		{"empty plugins", `{"cniVersion":"1.0.0","name":"n","plugins":[]}`, "could not load"},
		{"plugins not a list", `{"cniVersion":"1.0.0","name":"n","plugins":{"type":"bridge"}}`, "could not load"},
		{"plugin without type", `{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"cni0"}]}`, "missing 'type'"},
		{"no name", `{"plugins":[{"type":"bridge"}]}`, "no name"},
		{"duplicate plugins key", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"}],"plugins":[{"type":"b"}]}`, "appears twice"},
		{"version without prevResult", `{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}`, `cniVersion "0.2.0"`},
		{"no version", `{"name":"n","plugins":[{"type":"bridge"}]}`, `cniVersion ""`},
		{"version from the future", `{"cniVersion":"9.0.0","name":"n","plugins":[{"type":"bridge"}]}`, `cniVersion "9.0.0"`},
		{"only metaconceal", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"metaconceal"}]}`, "no main plugin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out, _, err := Insert([]byte(tc.in), entry)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Insert(%s) = %s, %v; want error containing %q", tc.in, out, err, tc.wantErr)
			}
		})
	}
}

// TestInstallRefusesWithoutWriting checks a file that cannot be patched stays as it was
// and no temporary file is left.
func TestInstallRefusesWithoutWriting(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, file, body, wantErr string
	}{
		{"bad JSON conflist", "10-x.conflist", "{\"cniVersion\":\"0.4.0\",\"name\":\"n\",\"plugins\":[{\"type\":\"bridge\"}\n", "not valid JSON"},
		{"bad JSON conf", "10-x.conf", "{\"type\":", "not valid JSON"},
		{"conf without type", "10-x.conf", `{"name":"n","cniVersion":"0.4.0"}`, "missing 'type'"},
		{"conflist in a .conf", "10-x.conf", `{"cniVersion":"0.4.0","name":"n","type":"bridge","plugins":[{"type":"bridge"}]}`, `also has a "plugins" key`},
		{"empty plugins", "10-x.conflist", `{"cniVersion":"1.0.0","name":"n","plugins":[]}`, "no plugins"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, tc.file)
			if err := os.WriteFile(path, []byte(tc.body), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Install(dir, entry)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Install: %v; want error containing %q", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the file", err)
			}
			if got := readFile(t, path); string(got) != tc.body {
				t.Errorf("file changed to %s", got)
			}
			assertOnlyFiles(t, dir, tc.file)
		})
	}
}

func TestPrimary(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := Primary(dir); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("empty dir: %v, want ErrNoConfig", err)
	}
	if _, err := Primary(filepath.Join(dir, "missing")); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("missing dir: %v, want ErrNoConfig", err)
	}
	for _, d := range []string{"00-dir.conflist", "10-net"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"README.md", "calico-kubeconfig", "05-x.conflist.bak", ".05-x.conflist" + tempMarker + "123", "20-b.conflist", "10-a.json", "15-c.conf"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Primary(dir)
	if err != nil || filepath.Base(got) != "10-a.json" {
		t.Fatalf("Primary = %s, %v; want 10-a.json", got, err)
	}
	// libcni does not skip hidden files, so the runtime would load this one first.
	if err := os.WriteFile(filepath.Join(dir, ".00-hidden.conflist"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := Primary(dir); filepath.Base(got) != ".00-hidden.conflist" {
		t.Errorf("Primary = %s; want the hidden file the runtime would load", got)
	}
}

func TestInstallConversionGuards(t *testing.T) {
	t.Parallel()
	conf := `{"cniVersion":"0.4.0","name":"n","type":"bridge"}`
	t.Run("another file would sort between", func(t *testing.T) {
		t.Parallel()
		dir := writeFiles(t, map[string]string{"10-b.conf": conf, "10-b.conf-old.json": conf})
		if _, err := Install(dir, entry); !errors.Is(err, ErrNotChainable) || !strings.Contains(err.Error(), "10-b.conf-old.json") {
			t.Fatalf("Install: %v; want a refusal naming 10-b.conf-old.json", err)
		}
		assertOnlyFiles(t, dir, "10-b.conf", "10-b.conf-old.json")
	})
	t.Run("target exists and is not ours", func(t *testing.T) {
		t.Parallel()
		dir := writeFiles(t, map[string]string{"10-b.conf": conf, "10-b.conflist": `{"name":"o","plugins":[{"type":"ptp"}]}`})
		if _, err := Install(dir, entry); !errors.Is(err, ErrNotChainable) || !strings.Contains(err.Error(), "already exists") {
			t.Fatalf("Install: %v; want a refusal", err)
		}
		if got := readFile(t, filepath.Join(dir, "10-b.conflist")); !strings.Contains(string(got), `"o"`) {
			t.Errorf("foreign conflist overwritten: %s", got)
		}
	})
	t.Run("owner re-creates its .conf after conversion", func(t *testing.T) {
		t.Parallel()
		dir := writeFiles(t, map[string]string{"10-b.conf": conf})
		if _, err := Install(dir, entry); err != nil {
			t.Fatal(err)
		}
		first := readFile(t, filepath.Join(dir, "10-b.conflist"))
		if err := os.WriteFile(filepath.Join(dir, "10-b.conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		ch, err := Install(dir, entry)
		if err != nil || ch.Action != Converted {
			t.Fatalf("Install after re-creation: %+v, %v", ch, err)
		}
		assertOnlyFiles(t, dir, "10-b.conflist")
		if got := readFile(t, filepath.Join(dir, "10-b.conflist")); !bytes.Equal(got, first) {
			t.Errorf("second conversion differs:\n%s\n%s", got, first)
		}
		// The owner re-creates it again and then we uninstall: the stale list goes.
		if err := os.WriteFile(filepath.Join(dir, "10-b.conf"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Uninstall(dir); err != nil {
			t.Fatal(err)
		}
		assertOnlyFiles(t, dir, "10-b.conf")
	})
	t.Run(".json becomes .conflist and comes back", func(t *testing.T) {
		t.Parallel()
		dir := writeFiles(t, map[string]string{"99-loopback.json": `{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}`})
		ch, err := Install(dir, entry)
		if err != nil || filepath.Base(ch.Path) != "99-loopback.conflist" {
			t.Fatalf("Install: %+v, %v", ch, err)
		}
		if _, err := Uninstall(dir); err != nil {
			t.Fatal(err)
		}
		assertOnlyFiles(t, dir, "99-loopback.json")
		// Not written with two-space indentation: the meaning comes back, not the bytes.
		got := readFile(t, filepath.Join(dir, "99-loopback.json"))
		want := "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"lo\",\n  \"type\": \"loopback\"\n}\n"
		if string(got) != want {
			t.Errorf("reverted to %q, want %q", got, want)
		}
	})
	t.Run("list-level settings added after conversion keep the list", func(t *testing.T) {
		t.Parallel()
		dir := writeFiles(t, map[string]string{"10-b.conf": conf})
		if _, err := Install(dir, entry); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "10-b.conflist")
		edited := strings.Replace(string(readFile(t, path)), "{\n", "{\n  \"disableCheck\": true,\n", 1)
		if err := os.WriteFile(path, []byte(edited), 0o644); err != nil {
			t.Fatal(err)
		}
		changes, err := Uninstall(dir)
		if err != nil || len(changes) != 1 || changes[0].Action != Removed {
			t.Fatalf("Uninstall: %+v, %v", changes, err)
		}
		assertOnlyFiles(t, dir, "10-b.conflist")
		if strings.Contains(string(readFile(t, path)), `"type": "metaconceal"`) {
			t.Error("entry still there")
		}
	})
}

func TestInstallRefusesSymlink(t *testing.T) {
	t.Parallel()
	dir := writeFiles(t, map[string]string{"real.txt": `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}`})
	if err := os.Symlink("real.txt", filepath.Join(dir, "10-n.conflist")); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(dir, entry); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("Install: %v; want a refusal", err)
	}
	if info, err := os.Lstat(filepath.Join(dir, "10-n.conflist")); err != nil || info.Mode()&os.ModeSymlink == 0 {
		t.Errorf("symlink replaced: %v, %v", info, err)
	}
}

func TestInstallRefusesPluginDir(t *testing.T) {
	t.Parallel()
	dir := writeFiles(t, map[string]string{"10-n.conflist": `{"name":"net1","cniVersion":"1.1.0","plugins":[{"type":"bridge"}]}`})
	if err := os.Mkdir(filepath.Join(dir, "net1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "net1", "50-portmap.conf"), []byte(`{"type":"portmap"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(dir, entry); !errors.Is(err, ErrNotChainable) {
		t.Fatalf("Install: %v; want ErrNotChainable", err)
	}
}

func TestUninstallAllFiles(t *testing.T) {
	t.Parallel()
	withEntry := `{"name":"a","plugins":[{"type":"bridge"},{"type":"metaconceal"}]}`
	dir := writeFiles(t, map[string]string{
		"10-a.conflist": withEntry,
		"20-b.conflist": withEntry,
		"30-c.conflist": `{"name":"c","plugins":[{"type":"ptp"}]}`,
		"40-d.conflist": `not json, and not ours`,
	})
	changes, err := Uninstall(dir)
	if err != nil || len(changes) != 2 {
		t.Fatalf("Uninstall: %+v, %v; want two removals", changes, err)
	}
	for _, f := range []string{"10-a.conflist", "20-b.conflist"} {
		if got := string(readFile(t, filepath.Join(dir, f))); got != `{"name":"a","plugins":[{"type":"bridge"}]}` {
			t.Errorf("%s = %s", f, got)
		}
	}
	// A broken file that names our plugin is an error: the entry may still be in use.
	if err := os.WriteFile(filepath.Join(dir, "50-e.conflist"), []byte(`{"plugins":[{"type":"metaconceal"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Uninstall(dir); err == nil || !strings.Contains(err.Error(), "50-e.conflist") {
		t.Errorf("Uninstall: %v; want an error naming 50-e.conflist", err)
	}
}

func TestWriteFileAtomicKeepsMode(t *testing.T) {
	t.Parallel()
	for _, mode := range []os.FileMode{0o600, 0o644, 0o640, 0o755} {
		dir := t.TempDir()
		path := filepath.Join(dir, "f.conflist")
		if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := WriteFileAtomic(path, []byte("new"), info); err != nil {
			t.Fatal(err)
		}
		assertMode(t, path, mode)
		if got := readFile(t, path); string(got) != "new" {
			t.Errorf("content %q", got)
		}
		assertOnlyFiles(t, dir, "f.conflist")
	}
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}
