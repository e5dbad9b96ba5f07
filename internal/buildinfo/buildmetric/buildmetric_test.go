package buildmetric

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
)

// TestCollector registers the gauge on a fresh registry and reads it back as a scrape
// would.
func TestCollector(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	reg.MustRegister(For(buildinfo.Info{Version: "1.2.3", Commit: "abc123", GoVersion: "go1.26.8"}))
	want := `
# HELP metaconceal_build_info Always 1; its labels name the build: version, commit and the Go version it was built with.
# TYPE metaconceal_build_info gauge
metaconceal_build_info{commit="abc123",goversion="go1.26.8",version="1.2.3"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), Name); err != nil {
		t.Error(err)
	}
	// This build's own collector registers on another fresh registry: one series.
	reg2 := prometheus.NewRegistry()
	reg2.MustRegister(New())
	if n, err := testutil.GatherAndCount(reg2, Name); err != nil || n != 1 {
		t.Errorf("New: %d series, %v; want 1", n, err)
	}
}

// TestPluginDoesNotLinkPrometheus: the CNI plugin starts once per pod, and the
// Prometheus client's initialisers are a measurable part of its ADD (see the package
// doc). Nothing the plugin imports may bring them back.
func TestPluginDoesNotLinkPrometheus(t *testing.T) {
	t.Parallel()
	out, err := exec.Command("go", "list", "-deps", "github.com/metaconceal/metaconceal/plugins/metaconceal").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps gave %d packages, expected the plugin's whole graph:\n%s", len(deps), out)
	}
	for _, d := range deps {
		if strings.HasPrefix(d, "github.com/prometheus/") || strings.HasPrefix(d, "google.golang.org/protobuf/") {
			t.Errorf("the plugin links %s", d)
		}
	}
}
