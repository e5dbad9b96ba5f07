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

// TestVersion builds the proxy as `make build` does: --version prints the build on
// stdout and exits 0; a subcommand still runs.
func TestVersion(t *testing.T) {
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal-proxy", "1.2.3-test", "abc123")
	want := "metaconceal-proxy 1.2.3-test (commit abc123, " + runtime.Version() + ")\n"
	for _, arg := range []string{"--version", "-version"} {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, arg)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil || stdout.String() != want {
			t.Errorf("%s: stdout %q, stderr %q, %v; want %q, exit 0", arg, stdout.String(), stderr.String(), err, want)
		}
	}
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
	cmd := node.Command(context.Background(), bin, "--host-guard=false", "--listen", "127.0.0.1:988", "--alts-listen=",
		"--metrics-listen", "127.0.0.1:989", "--upstream", "http://127.0.0.1:9", "--state-dir", t.TempDir())
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
	body, err := simnode.GetWhenUp(ctx, node.Path, "http://127.0.0.1:989/metrics", exited)
	if err != nil {
		log, _ := os.ReadFile(logFile) // best effort, for the message
		t.Fatalf("%v\nproxy log:\n%s", err, log)
	}
	want := `metaconceal_build_info{commit="abc123",goversion="` + runtime.Version() + `",version="1.2.3-test"} 1`
	if !strings.Contains(body, want) {
		t.Errorf("/metrics lacks %s:\n%s", want, body)
	}
}
