package main

import (
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TestVersion builds the proxy as `make build` does: --version prints the build on
// stdout and exits 0; a subcommand still runs.
func TestVersion(t *testing.T) {
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-proxy", "1.2.3-test", "abc123")
	want := "metaconceal-proxy 1.2.3-test (commit abc123, " + runtime.Version() + ")\n"
	testutil.CheckVersionFlag(t, bin, want)
	out, err := exec.Command(bin, "remove-host-guard", "-h").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "usage: metaconceal-proxy remove-host-guard") {
		t.Errorf("remove-host-guard -h: %v\n%s", err, out)
	}
}

// TestBuildInfoMetric runs the built proxy in a simulated node (host guard off, on
// loopback only) and scrapes metaconceal_build_info from its metrics listener.
func TestBuildInfoMetric(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "go")
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-proxy", "1.2.3-test", "abc123")
	node, err := simnode.New("mc-bi-proxy")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	body, err := node.GetFromServer(bin, []string{"--host-guard=false", "--listen", "127.0.0.1:988", "--alts-listen=",
		"--metrics-listen", "127.0.0.1:989", "--upstream", "http://127.0.0.1:9", "--state-dir", t.TempDir()}, "http://127.0.0.1:989/metrics")
	if err != nil {
		t.Fatal(err)
	}
	want := `metaconceal_build_info{commit="abc123",goversion="` + runtime.Version() + `",version="1.2.3-test"} 1`
	if !strings.Contains(body, want) {
		t.Errorf("/metrics lacks %s:\n%s", want, body)
	}
}
