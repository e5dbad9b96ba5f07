package main

// `metaconceal-install selftest`: the datapath self-test (pkg/selftest) on one pod
// netns, on demand. Wiring only.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/metaconceal/metaconceal/pkg/netconf"
	"github.com/metaconceal/metaconceal/pkg/selftest"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Exit codes of the selftest subcommand.
const (
	selftestEffective = 0
	selftestNotRun    = 1
	selftestBypassed  = 3
)

// runSelftest prints one line on stdout: "selftest: guard effective..." (exit 0),
// "selftest: guard BYPASSED..." (exit 3) or "selftest: could not run: ..." (exit 1).
func runSelftest(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("metaconceal-install selftest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	netns := fs.String("pod-netns", "", "the pod's network namespace (a path); empty: the first concealed pod of --state-dir")
	iface := fs.String("iface", "", "the pod's interface (default: the state record's, else "+selftest.DefaultIfName+")")
	stateDir := fs.String("state-dir", state.DefaultDir, "the plugin's state dir: names the pod, and picks one when --pod-netns is empty")
	proxy := fs.String("proxy", netconf.DefaultProxy, "the proxy's address, asked for the self-test path first from this netns (empty: not asked)")
	backend := fs.String("iptables-backend", string(xtables.BackendAuto), "iptables binaries for the probe's transient rule in the pod netns: auto, nft or legacy")
	timeout := fs.Duration("timeout", selftest.DefaultTimeout, "how long the probe may take")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-install selftest [--pod-netns PATH] [flags]")
		fmt.Fprintln(stderr, "Sends a raw-socket request from the pod to the metadata server, around the pod's own rules, and says whether the node's host guard caught it.")
		fmt.Fprintln(stderr, "Exit codes: 0 guard effective, 3 guard BYPASSED, 1 could not run.")
		fs.PrintDefaults()
	}
	notRun := func(err error) int {
		fmt.Fprintf(stdout, "selftest: could not run: %v\n", err)
		return selftestNotRun
	}
	if err := fs.Parse(args); err != nil {
		return notRun(err)
	}
	if fs.NArg() > 0 {
		return notRun(fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	cfg := selftest.Config{Netns: *netns, IfName: *iface, Timeout: *timeout}
	var err error
	if cfg.Backend, err = xtables.ParseBackend(*backend); err != nil {
		return notRun(fmt.Errorf("--iptables-backend: %w", err))
	}
	if *proxy != "" {
		if cfg.Proxy, err = netip.ParseAddrPort(*proxy); err != nil {
			return notRun(fmt.Errorf("--proxy: %w", err))
		}
	}
	pod, err := pickPod(&cfg, *stateDir)
	if err != nil {
		return notRun(err)
	}
	res, err := selftest.Run(ctx, cfg)
	if err != nil {
		return notRun(err)
	}
	where := fmt.Sprintf("from pod %s (%s on %s) to %s", pod, res.Src, res.IfName, "the metadata server")
	took := res.Took.Round(time.Millisecond)
	switch res.Verdict {
	case selftest.Effective:
		fmt.Fprintf(stdout, "selftest: guard effective: a raw-socket request %s reached the metaconceal proxy (took %s)\n", where, took)
		return selftestEffective
	case selftest.Blocked:
		fmt.Fprintf(stdout, "selftest: guard effective: a raw-socket request %s was dropped or reset before reaching any server (%s; took %s)\n", where, res.Detail, took)
		return selftestEffective
	default:
		fmt.Fprintf(stdout, "selftest: guard BYPASSED: a raw-socket request %s was answered %q by a server that is not the proxy: this datapath goes around the host guard (docs/datapath.md; took %s)\n", where, res.Status, took)
		return selftestBypassed
	}
}

// pickPod names the pod of cfg.Netns from the state records, or picks the first
// concealed pod there when cfg.Netns is empty; it fills cfg.IfName from the record
// when the flag left it empty.
func pickPod(cfg *selftest.Config, stateDir string) (string, error) {
	records, listErr := state.List(stateDir)
	if cfg.Netns == "" {
		cands := selftest.Candidates(records)
		if len(cands) == 0 {
			return "", errors.Join(fmt.Errorf("no --pod-netns, and no concealed pod in %s", stateDir), listErr)
		}
		cfg.Netns = cands[0].Netns
		if cfg.IfName == "" {
			cfg.IfName = cands[0].IfName
		}
		return selftest.PodName(cands[0]), nil
	}
	for _, r := range records {
		if r.Netns == cfg.Netns && (cfg.IfName == "" || cfg.IfName == r.IfName) {
			if cfg.IfName == "" {
				cfg.IfName = r.IfName
			}
			return selftest.PodName(r), nil
		}
	}
	return cfg.Netns, nil // a netns without a record (an operator's own probe) is named by its path
}
