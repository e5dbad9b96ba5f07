package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
)

// BuildVersioned builds the main package pkg (e.g. ".") into a temp dir as name, as
// `make build` does (static, -trimpath, -s) with the build's version and commit set
// through -ldflags -X; it returns the binary's path.
func BuildVersioned(t testing.TB, pkg, name, version, commit string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	ldflags := "-s -X " + buildinfo.VersionVar + "=" + version + " -X " + buildinfo.CommitVar + "=" + commit
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags="+ldflags, "-o", bin, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// CheckVersionFlag runs bin with --version and with -version alone: each must print
// want (the whole line) on stdout and exit 0.
func CheckVersionFlag(t testing.TB, bin, want string) {
	t.Helper()
	for _, arg := range []string{"--version", "-version"} {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, arg)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil || stdout.String() != want {
			t.Errorf("%s: stdout %q, stderr %q, %v; want %q, exit 0", arg, stdout.String(), stderr.String(), err, want)
		}
	}
}
