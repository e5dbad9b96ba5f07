package main

import (
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TestVersion builds the installer as `make build` does: --version prints the build on
// stdout and exits 0; the selftest subcommand and the installer's flags still parse.
func TestVersion(t *testing.T) {
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-install", "1.2.3-test", "abc123")
	want := "metaconceal-install 1.2.3-test (commit abc123, " + runtime.Version() + ")\n"
	testutil.CheckVersionFlag(t, bin, want)
	// selftest with a stray argument: its own refusal, exit 1.
	out, err := exec.Command(bin, "selftest", "extra").Output()
	if code := exitCode(err); code != selftestNotRun || !strings.Contains(string(out), "selftest: could not run: unexpected arguments") {
		t.Errorf("selftest extra: exit %d, stdout %q", code, out)
	}
	// --version beside other flags is not a version request: the flag package refuses it.
	if err := exec.Command(bin, "--once", "--version").Run(); exitCode(err) != 2 {
		t.Errorf("--once --version: %v, want exit 2", err)
	}
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestBuildInfoMetric runs the built node agent (watch mode, metrics only) in a
// simulated node and scrapes metaconceal_build_info from its metrics listener.
func TestBuildInfoMetric(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "go")
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-install", "1.2.3-test", "abc123")
	binDir, confDir, plugin := setup(t, flannel)
	node, err := simnode.New("mc-bi-agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	body, err := node.GetFromServer(bin, []string{"--cni-bin-dir", binDir, "--cni-conf-dir", confDir, "--plugin-binary", plugin,
		"--metrics-listen", "127.0.0.1:990", "--selftest-interval=0", "--state-dir", t.TempDir()}, "http://127.0.0.1:990/metrics")
	if err != nil {
		t.Fatal(err)
	}
	want := `metaconceal_build_info{commit="abc123",goversion="` + runtime.Version() + `",version="1.2.3-test"} 1`
	if !strings.Contains(body, want) {
		t.Errorf("/metrics lacks %s:\n%s", want, body)
	}
}
