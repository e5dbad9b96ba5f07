// Package buildinfo says which build a program is: its version and commit, set by the
// Makefile through -ldflags -X (VersionVar, CommitVar), else read from the Go build
// information (the module version, vcs.revision), and the Go version it was built
// with. Every program prints it for --version; the proxy and the node agent export it as
// the metaconceal_build_info metric (package buildmetric, kept apart so that the CNI
// plugin, started once per pod, does not link the Prometheus client).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Set by the linker: go build -ldflags "-X <VersionVar>=1.2.3 -X <CommitVar>=<sha>".
var version, commit string

// The linker symbols the Makefile and conf/Dockerfile set.
const (
	VersionVar = "github.com/metaconceal/metaconceal/internal/buildinfo.version"
	CommitVar  = "github.com/metaconceal/metaconceal/internal/buildinfo.commit"
)

// What a build without either source reports.
const (
	UnknownVersion = "dev"
	UnknownCommit  = "unknown"
)

// Info is a build's identity.
type Info struct {
	Version   string
	Commit    string
	GoVersion string
}

// Get returns this program's build.
func Get() Info {
	bi, _ := debug.ReadBuildInfo() // nil without build information: the fallbacks apply
	return resolve(version, commit, bi, runtime.Version())
}

// resolve prefers the linker's values, then the build information's.
func resolve(ldVersion, ldCommit string, bi *debug.BuildInfo, goVersion string) Info {
	i := Info{Version: ldVersion, Commit: ldCommit, GoVersion: goVersion}
	if bi != nil {
		if i.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			i.Version = bi.Main.Version
		}
		if i.Commit == "" {
			var rev, modified string
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					rev = s.Value
				case "vcs.modified":
					modified = s.Value
				}
			}
			if rev != "" && modified == "true" {
				rev += "-dirty"
			}
			i.Commit = rev
		}
	}
	if i.Version == "" {
		i.Version = UnknownVersion
	}
	if i.Commit == "" {
		i.Commit = UnknownCommit
	}
	return i
}

// String is the --version line: "<program> <version> (commit <commit>, <go version>)".
func (i Info) String(program string) string {
	return fmt.Sprintf("%s %s (commit %s, %s)", program, i.Version, i.Commit, i.GoVersion)
}

// String is this program's --version line.
func String(program string) string { return Get().String(program) }

// VersionRequested reports whether a program's arguments (os.Args[1:]) ask for its
// version only: --version (or -version, as the flag package reads it) alone.
func VersionRequested(args []string) bool {
	return len(args) == 1 && (args[0] == "--version" || args[0] == "-version")
}
