// Command metaconceal is the chained CNI plugin that conceals the GCE metadata server
// from pods: see docs/plugin.md. The verbs live in pkg/cniplugin.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/metaconceal/metaconceal/pkg/cniplugin"
)

func main() {
	p := &cniplugin.Plugin{}
	skel.PluginMainFuncs(p.Funcs(), cniplugin.SupportedVersions, cniplugin.About)
}
