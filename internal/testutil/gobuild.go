package testutil

import (
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
