// Command metaconceal is the chained CNI plugin that conceals the GCE metadata server
// from pods: see docs/plugin.md. The verbs live in pkg/cniplugin.
package main

import (
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
	"github.com/metaconceal/metaconceal/pkg/cniplugin"
)

// name is the binary's name, as --version prints it.
const name = "metaconceal"

func main() {
	// Run by hand, `metaconceal --version` prints the build and exits 0. Only without
	// CNI_COMMAND: a runtime's call always goes to skel, whose stdout carries JSON only.
	if os.Getenv("CNI_COMMAND") == "" && buildinfo.VersionRequested(os.Args[1:]) {
		fmt.Println(buildinfo.String(name))
		return
	}
	p := &cniplugin.Plugin{}
	// Without CNI_COMMAND (and without --version) skel prints this on stderr.
	skel.PluginMainFuncs(p.Funcs(), cniplugin.SupportedVersions, cniplugin.About+"\n"+buildinfo.String(name))
}
