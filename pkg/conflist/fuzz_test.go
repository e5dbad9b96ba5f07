package conflist

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// FuzzInsertRemove checks, for any bytes: Insert either refuses or returns a list the
// runtime loads with our entry exactly once and not first (last when added), which
// Insert then leaves unchanged; and when
// it added the entry, Remove gives back the input byte for byte.
func FuzzInsertRemove(f *testing.F) {
	inputs, _ := filepath.Glob(filepath.Join(testdata, "input", "*.conflist"))
	for _, in := range inputs {
		if b, err := os.ReadFile(in); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(`{"name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"X"}]}`))
	f.Add([]byte(`{"name":"n","plugins":[{"type":"metaconceal"},{"type":"bridge"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		out, action, err := Insert(data, entry)
		if err != nil {
			return
		}
		list, err := libcni.NetworkConfFromBytes(out)
		if err != nil {
			t.Fatalf("Insert produced a list the runtime cannot load: %v\n%s", err, out)
		}
		var ours []int
		for i, p := range list.Plugins {
			if p.Network.Type == PluginType {
				ours = append(ours, i)
			}
		}
		if len(ours) != 1 || ours[0] == 0 || (action == Added && ours[0] != len(list.Plugins)-1) {
			t.Fatalf("action %s: metaconceal at %v of %d plugins; want once, chained, last when added", action, ours, len(list.Plugins))
		}
		again, action2, err := Insert(out, entry)
		if err != nil || action2 != Unchanged || !bytes.Equal(again, out) {
			t.Fatalf("second Insert: %s, %v", action2, err)
		}
		if action == Added {
			back, _, err := Remove(out)
			if err != nil || !bytes.Equal(back, data) {
				t.Fatalf("Remove did not restore the input: %v\n%q\n%q", err, back, data)
			}
		}
	})
}
