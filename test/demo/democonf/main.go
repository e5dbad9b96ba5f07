// Command democonf turns the example conflist in conf/ into the one the demo runs on its
// simulated node: the plugin chain and its options stay as shipped; only the
// machine-specific parts (network and bridge names, pod subnet, host-local's dataDir,
// metaconceal's stateDir and logFile) point at throwaway places, so the demo writes
// nothing to /run/metaconceal or /var/lib/cni/networks.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
)

func main() {
	in := flag.String("in", "", "conflist to start from (empty: the first bridge + host-local + metaconceal conflist under -conf-root)")
	confRoot := flag.String("conf-root", "conf", "where to look when -in is empty")
	var o harness.ConflistOptions
	var exclude, subnets string
	flag.StringVar(&o.Name, "name", "metaconceal-demo", "network name")
	flag.StringVar(&o.Bridge, "bridge", "mcdemo0", "bridge device in the node netns")
	flag.StringVar(&subnets, "subnet", "10.88.0.0/24", "pod subnet(s), comma-separated")
	flag.StringVar(&o.IPAMDir, "ipam-dir", "", "host-local dataDir")
	flag.StringVar(&o.StateDir, "state-dir", "", "metaconceal stateDir")
	flag.StringVar(&o.LogFile, "log-file", "", "metaconceal logFile")
	flag.StringVar(&exclude, "exclude", "", "comma-separated excludeNamespaces (empty: as shipped)")
	flag.StringVar(&o.CNIVersion, "cni-version", "", "override cniVersion")
	flag.Parse()
	o.Subnets = strings.Split(subnets, ",")
	if exclude != "" {
		o.Exclude = strings.Split(exclude, ",")
	}

	path := *in
	if path == "" {
		found, err := harness.FindExampleConflist(*confRoot, false)
		if err != nil {
			fail(err)
		}
		path = found
	}
	data, err := os.ReadFile(path)
	if err != nil {
		fail(fmt.Errorf("read conflist: %w", err))
	}
	out, err := harness.RewriteConflist(data, o)
	if err != nil {
		fail(fmt.Errorf("%s: %w", path, err))
	}
	fmt.Fprintf(os.Stderr, "democonf: using %s\n", path)
	os.Stdout.Write(append(out, '\n'))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "democonf:", err)
	os.Exit(1)
}
