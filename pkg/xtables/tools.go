package xtables

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Tools are the programs of one backend and family: names (Names) or absolute paths
// (ToolsFor).
type Tools struct {
	Restore  string
	Save     string
	Iptables string
}

// Names returns the program names of backend for family, e.g. ip6tables-legacy,
// ip6tables-legacy-restore and ip6tables-legacy-save; BackendAuto (or empty) gives the
// plain names.
func Names(backend Backend, family Family) (Tools, error) {
	base := "iptables"
	if family == IPv6 {
		base = "ip6tables"
	}
	switch backend {
	case BackendAuto, "":
	case BackendNFT, BackendLegacy:
		base += "-" + string(backend)
	default:
		return Tools{}, fmt.Errorf("xtables: %w", backend.Validate())
	}
	return Tools{Restore: base + "-restore", Save: base + "-save", Iptables: base}, nil
}

// fallbackDirs are searched when PATH does not hold a program: runtimes do not always
// pass a PATH to CNI plugins.
var fallbackDirs = []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"}

// ToolsFor resolves the programs of backend for family to absolute paths: on PATH,
// then in the usual sbin and bin directories. Every program must be there.
func ToolsFor(backend Backend, family Family) (Tools, error) {
	t, err := Names(backend, family)
	if err != nil {
		return Tools{}, err
	}
	for _, p := range []*string{&t.Restore, &t.Save, &t.Iptables} {
		if *p, err = LookPath(*p); err != nil {
			return Tools{}, err
		}
	}
	return t, nil
}

// LookPath finds program name on PATH, then in the usual sbin and bin directories,
// and returns its absolute path.
func LookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range fallbackDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("xtables: %s not found on PATH nor in %s", name, strings.Join(fallbackDirs, ", "))
}
