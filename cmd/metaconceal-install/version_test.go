package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TestVersion builds the installer as `make build` does: --version prints the build on
// stdout and exits 0; the selftest subcommand and the installer's flags still parse.
func TestVersion(t *testing.T) {
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-install", "1.2.3-test", "abc123")
	want := "metaconceal-install 1.2.3-test (commit abc123, " + runtime.Version() + ")\n"
	for _, arg := range []string{"--version", "-version"} {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, arg)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil || stdout.String() != want {
			t.Errorf("%s: stdout %q, stderr %q, %v; want %q, exit 0", arg, stdout.String(), stderr.String(), err, want)
		}
	}
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
	cmd := node.Command(context.Background(), bin, "--cni-bin-dir", binDir, "--cni-conf-dir", confDir, "--plugin-binary", plugin,
		"--metrics-listen", "127.0.0.1:990", "--selftest-interval=0", "--state-dir", t.TempDir())
	logFile := filepath.Join(t.TempDir(), "log") // a file: readable while the process runs
	logs, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }() // the exit is reported through exited
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM) // it may have exited already
		<-exited
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	body, err := simnode.GetWhenUp(ctx, node.Path, "http://127.0.0.1:990/metrics", exited)
	if err != nil {
		log, _ := os.ReadFile(logFile) // best effort, for the message
		t.Fatalf("%v\nagent log:\n%s", err, log)
	}
	want := `metaconceal_build_info{commit="abc123",goversion="` + runtime.Version() + `",version="1.2.3-test"} 1`
	if !strings.Contains(body, want) {
		t.Errorf("/metrics lacks %s:\n%s", want, body)
	}
}
