package cni

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/metaconceal/metaconceal/pkg/netconf"
)

// exampleDir holds the conflists the docs and the demo point at.
const exampleDir = "../../conf/examples"

// Every example loads with libcni, and every metaconceal entry passes the plugin's own
// validation, with the version the list declares injected as libcni would.
func TestExamplesParse(t *testing.T) {
	t.Parallel()
	lists, err := filepath.Glob(filepath.Join(exampleDir, "*.conflist"))
	if err != nil || len(lists) < 3 {
		t.Fatalf("want at least 3 example conflists, got %v (%v)", lists, err)
	}
	for _, path := range lists {
		list, err := libcni.ConfListFromFile(path)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		types := make([]string, len(list.Plugins))
		for i, p := range list.Plugins {
			types[i] = p.Network.Type
			if p.Network.Type != "metaconceal" {
				continue
			}
			if _, err := netconf.Parse(p.Bytes); err != nil {
				t.Errorf("%s: metaconceal entry: %v", path, err)
			}
		}
		if i := slices.Index(types, "metaconceal"); i < 1 || i != len(types)-1 {
			t.Errorf("%s: metaconceal must be chained last, after the main plugin: %v", path, types)
		}
	}
	if _, err := libcni.ConfFromFile(filepath.Join(exampleDir, "99-loopback.conf")); err != nil {
		t.Errorf("loopback example: %v", err)
	}
}
