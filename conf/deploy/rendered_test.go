package deploy_test

import (
	"flag"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/chart"
)

var update = flag.Bool("update", false, "rewrite the rendered files of conf/deploy from charts/metaconceal (make manifests)")

// TestRenderedFromChart: the manifests beside this file are the chart's default values
// rendered (internal/testlib/chart.Deploy), byte for byte, so that `kubectl apply -k
// conf/deploy` and `helm install` create the same objects. -update (make manifests)
// writes them.
func TestRenderedFromChart(t *testing.T) {
	files := chart.Deploy(t)
	var names []string
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		want := files[name]
		if *update {
			if err := os.WriteFile(name, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(name)
		if err != nil {
			t.Errorf("%v (run make manifests)", err)
			continue
		}
		if string(got) != string(want) {
			t.Errorf("conf/deploy/%s is not what charts/metaconceal renders: run make manifests (edit the chart, not the file)", name)
		}
	}
	// Every manifest here is rendered: a hand-written one would escape the chart.
	for _, dir := range []string{".", "optional", "uninstall"} {
		matches, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range matches {
			if filepath.Base(m) == "kustomization.yaml" {
				continue
			}
			if _, ok := files[filepath.ToSlash(m)]; !ok {
				t.Errorf("conf/deploy/%s is not rendered from the chart", m)
			}
		}
	}
}
