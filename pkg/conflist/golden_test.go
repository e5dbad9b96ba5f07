package conflist

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

var update = flag.Bool("update", false, "rewrite the golden files under test/testdata/conflists/golden")

const testdata = "../../test/testdata/conflists"

var goldenEntry = Entry{Mode: "SECURE", Proxy: "169.254.169.252:988"}

// TestGolden installs the entry into each real-world config, compares the result with
// its golden file, installs again (nothing may change), and uninstalls (the original
// bytes must come back).
func TestGolden(t *testing.T) {
	inputs, err := filepath.Glob(filepath.Join(testdata, "input", "*"))
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no inputs under %s/input: %v", testdata, err)
	}
	for _, in := range inputs {
		name := filepath.Base(in)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			original, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			src := filepath.Join(dir, name)
			if err := os.WriteFile(src, original, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(src, 0o640); err != nil { // an unusual mode that must survive
				t.Fatal(err)
			}

			ch, err := Install(dir, goldenEntry)
			if err != nil {
				t.Fatalf("Install: %v", err)
			}
			wantName := strings.TrimSuffix(name, filepath.Ext(name)) + ".conflist"
			if filepath.Base(ch.Path) != wantName {
				t.Fatalf("Install wrote %s, want %s", ch.Path, wantName)
			}
			if filepath.Ext(name) == ".conflist" && ch.Action != Added {
				t.Errorf("action %q, want %q", ch.Action, Added)
			}
			if filepath.Ext(name) != ".conflist" && (ch.Action != Converted || filepath.Base(ch.Removed) != name) {
				t.Errorf("change %+v, want a conversion removing %s", ch, name)
			}
			assertOnlyFiles(t, dir, wantName)
			got := readFile(t, ch.Path)
			assertMode(t, ch.Path, 0o640)

			golden := filepath.Join(testdata, "golden", wantName)
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("reading golden (run with -update to create it): %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("installed %s differs from %s:\n--- got\n%s\n--- want\n%s", name, golden, got, want)
			}
			assertSameMeaningPlusEntry(t, original, got, filepath.Ext(name) != ".conflist")

			again, err := Install(dir, goldenEntry)
			if err != nil {
				t.Fatalf("second Install: %v", err)
			}
			if again.Action != Unchanged {
				t.Errorf("second Install action %q, want %q", again.Action, Unchanged)
			}
			if twice := readFile(t, ch.Path); !bytes.Equal(twice, got) {
				t.Errorf("second Install changed the file:\n%s", twice)
			}

			changes, err := Uninstall(dir)
			if err != nil {
				t.Fatalf("Uninstall: %v", err)
			}
			if len(changes) != 1 {
				t.Fatalf("Uninstall changes %+v, want one", changes)
			}
			assertOnlyFiles(t, dir, name)
			if back := readFile(t, src); !bytes.Equal(back, original) {
				t.Errorf("uninstall did not restore %s byte for byte:\n--- got\n%s\n--- want\n%s", name, back, original)
			}
			assertMode(t, src, 0o640)

			if changes, err := Uninstall(dir); err != nil || len(changes) != 0 {
				t.Errorf("second Uninstall: changes %+v, err %v; want none", changes, err)
			}
		})
	}
}

// assertSameMeaningPlusEntry checks, through libcni as the runtime parses it, that the
// installed list runs the original plugins with their settings unchanged, then ours.
func assertSameMeaningPlusEntry(t *testing.T, original, installed []byte, single bool) {
	t.Helper()
	list, err := libcni.NetworkConfFromBytes(installed)
	if err != nil {
		t.Fatalf("runtime cannot load the installed config: %v", err)
	}
	var before []any
	var name, version string
	if single {
		conf, err := libcni.NetworkPluginConfFromBytes(original)
		if err != nil {
			t.Fatal(err)
		}
		before = []any{decode(t, original)}
		name, version = conf.Network.Name, conf.Network.CNIVersion
	} else {
		orig, err := libcni.NetworkConfFromBytes(original)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range orig.Plugins {
			before = append(before, decode(t, p.Bytes))
		}
		name, version = orig.Name, orig.CNIVersion
	}
	if list.Name != name || list.CNIVersion != version {
		t.Errorf("list name/cniVersion %q/%q, want %q/%q", list.Name, list.CNIVersion, name, version)
	}
	if len(list.Plugins) != len(before)+1 {
		t.Fatalf("%d plugins, want %d", len(list.Plugins), len(before)+1)
	}
	for i, b := range before {
		if a := decode(t, list.Plugins[i].Bytes); !reflect.DeepEqual(a, b) {
			t.Errorf("plugin %d changed meaning:\n got %v\nwant %v", i, a, b)
		}
	}
	last := decode(t, list.Plugins[len(before)].Bytes)
	want := map[string]any{"type": PluginType, "mode": "SECURE", "proxy": "169.254.169.252:988"}
	if !reflect.DeepEqual(last, want) {
		t.Errorf("last plugin %v, want %v", last, want)
	}
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return v
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Mode().Perm(); got != want {
		t.Errorf("%s mode %v, want %v", path, got, want)
	}
}

// assertOnlyFiles checks the directory holds exactly these names: no leftover temp
// file, no second config.
func assertOnlyFiles(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if !reflect.DeepEqual(got, names) {
		t.Errorf("dir holds %v, want %v", got, names)
	}
}
