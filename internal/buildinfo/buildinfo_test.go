package buildinfo

import (
	"runtime"
	"runtime/debug"
	"testing"
)

func TestResolve(t *testing.T) {
	t.Parallel()
	vcs := func(rev, modified string) *debug.BuildInfo {
		bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/metaconceal/metaconceal", Version: "(devel)"}}
		bi.Settings = []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
		return bi
	}
	tagged := vcs("0123abcd", "false")
	tagged.Main.Version = "v1.4.0"
	tests := []struct {
		name                string
		ldVersion, ldCommit string
		bi                  *debug.BuildInfo
		want                string
	}{
		{"ldflags win", "1.2.3", "abc123", tagged, "metaconceal-proxy 1.2.3 (commit abc123, go1.26.8)"},
		{"ldflags without build info", "1.2.3", "abc123", nil, "metaconceal-proxy 1.2.3 (commit abc123, go1.26.8)"},
		{"vcs revision, devel version", "", "", vcs("0123abcd", "false"), "metaconceal-proxy dev (commit 0123abcd, go1.26.8)"},
		{"vcs revision, modified tree", "", "", vcs("0123abcd", "true"), "metaconceal-proxy dev (commit 0123abcd-dirty, go1.26.8)"},
		{"module version", "", "", tagged, "metaconceal-proxy v1.4.0 (commit 0123abcd, go1.26.8)"},
		{"ldflags version, vcs commit", "1.2.3", "", tagged, "metaconceal-proxy 1.2.3 (commit 0123abcd, go1.26.8)"},
		{"no build info", "", "", nil, "metaconceal-proxy dev (commit unknown, go1.26.8)"},
		{"build info without vcs", "", "", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, "metaconceal-proxy dev (commit unknown, go1.26.8)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := resolve(tc.ldVersion, tc.ldCommit, tc.bi, "go1.26.8").String("metaconceal-proxy"); got != tc.want {
				t.Errorf("String = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestGetLinkerValues sets the variables as -ldflags -X does, and then not.
func TestGetLinkerValues(t *testing.T) {
	saved := [2]string{version, commit}
	t.Cleanup(func() { version, commit = saved[0], saved[1] })

	version, commit = "1.2.3", "abc123"
	if got, want := String("metaconceal"), "metaconceal 1.2.3 (commit abc123, "+runtime.Version()+")"; got != want {
		t.Errorf("with linker values: %q, want %q", got, want)
	}
	// A test binary has no vcs stamp and a (devel) main module: the fallbacks show.
	version, commit = "", ""
	got := Get()
	if got.Version == "" || got.Commit == "" || got.GoVersion != runtime.Version() {
		t.Errorf("without linker values: %+v, want every field set", got)
	}
	if got.Version == "1.2.3" || got.Commit == "abc123" {
		t.Errorf("without linker values: %+v still carries them", got)
	}
}

func TestVersionRequested(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{[]string{"--version"}, true},
		{[]string{"-version"}, true},
		{nil, false},
		{[]string{"--version", "--once"}, false},
		{[]string{"--once"}, false},
		{[]string{"version"}, false},
	} {
		if got := VersionRequested(tc.args); got != tc.want {
			t.Errorf("VersionRequested(%q) = %v, want %v", tc.args, got, tc.want)
		}
	}
}
