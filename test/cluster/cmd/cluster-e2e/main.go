// Command cluster-e2e runs the cluster end-to-end scenarios (test/cluster/scenario)
// against a cluster provider: `local` (a real one-node cluster on this machine, `make
// cluster-e2e`) or `kind` (Docker hosts, `make kind-e2e`). It builds the images,
// brings the cluster up, installs metaconceal from conf/deploy, runs every scenario,
// tears everything down (also on failure and on Ctrl-C), prints the time of each
// phase and one summary line per scenario:
//
//	scenario <name> PASS|FAIL <seconds>s <one-line detail>
//
// and exits 1 if any scenario failed (or the teardown did), 2 on bad flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/test/cluster/images"
	"github.com/metaconceal/metaconceal/test/cluster/local"
	"github.com/metaconceal/metaconceal/test/cluster/scenario"
	"github.com/metaconceal/metaconceal/test/kind"
)

type provider interface {
	scenario.Cluster
	Close() error
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout))
}

func run(args []string, stdout io.Writer) int {
	fs := flag.NewFlagSet("cluster-e2e", flag.ContinueOnError)
	providerName := fs.String("provider", "local", "cluster provider: local (this machine) or kind (Docker)")
	repo := fs.String("repo", ".", "repository root")
	binDir := fs.String("bin-dir", "bin", "where make build put the programs and CNI plugins")
	clusterBin := fs.String("cluster-bin-dir", "bin/cluster", "where make cluster-tools put etcd, kube-*, kubectl, ociarchive, probe, pause")
	debCache := fs.String("deb-cache", "bin/cluster/debs", "where downloaded Debian packages are kept between runs")
	cni := fs.String("cni", envOr("CLUSTER_CNI", "bridge"), "local provider: the node's main CNI datapath, "+strings.Join(local.CNIs, " or ")+" (default from $CLUSTER_CNI)")
	install := fs.String("install", envOr("CLUSTER_INSTALL", scenario.InstallKubectl), "how to install metaconceal: "+strings.Join(scenario.Installers, " (conf/deploy) or ")+" (charts/metaconceal, with scenario "+scenario.HelmScenario+") (default from $CLUSTER_INSTALL)")
	var only cliflag.List
	fs.Var(&only, "scenarios", "run only these scenarios (comma-separated); default all: "+strings.Join(scenario.Names(scenario.List()), ","))
	if err := fs.Parse(args); err != nil {
		return 2
	}
	list, err := scenario.Select(scenario.List(), only)
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster-e2e:", err)
		return 2
	}
	if !slices.Contains(scenario.Installers, *install) {
		fmt.Fprintf(os.Stderr, "cluster-e2e: --install %q: want %s\n", *install, strings.Join(scenario.Installers, " or "))
		return 2
	}
	if *install != scenario.InstallHelm {
		if slices.Contains(only, scenario.HelmScenario) {
			fmt.Fprintf(os.Stderr, "cluster-e2e: scenario %s needs --install=%s\n", scenario.HelmScenario, scenario.InstallHelm)
			return 2
		}
		list = slices.DeleteFunc(list, func(s scenario.Scenario) bool { return s.Name == scenario.HelmScenario })
	}
	if *providerName != "local" && *providerName != "kind" {
		fmt.Fprintf(os.Stderr, "cluster-e2e: --provider %q: want local or kind\n", *providerName)
		return 2
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return a
	}
	*repo, *binDir, *clusterBin, *debCache = abs(*repo), abs(*binDir), abs(*clusterBin), abs(*debCache)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var phases []string
	phase := func(name string, start time.Time) {
		line := fmt.Sprintf("phase %s %.1fs", name, time.Since(start).Seconds())
		phases = append(phases, line)
		fmt.Fprintln(stdout, line)
	}

	work, err := os.MkdirTemp("", "metaconceal-cluster-images-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster-e2e:", err)
		return 1
	}
	defer os.RemoveAll(work)

	// Phase: images.
	fmt.Fprintln(stdout, "==> images")
	start := time.Now()
	builder := &images.Builder{
		BinDir:     *binDir,
		OCIArchive: filepath.Join(*clusterBin, "ociarchive"),
		Probe:      filepath.Join(*clusterBin, "probe"),
		DebCache:   *debCache,
		WorkDir:    work,
		Log:        stdout,
	}
	archives, err := builder.Build(ctx)
	if err != nil {
		phase("images", start)
		fmt.Fprintln(stdout, "cluster-e2e: images:", err)
		return 1
	}
	pauseArchive := filepath.Join(work, "pause.tar")
	if err := harness.WritePauseArchive(filepath.Join(*clusterBin, "pause"), pauseArchive, harness.PauseImageRef); err != nil {
		fmt.Fprintln(stdout, "cluster-e2e: pause image:", err)
		return 1
	}
	phase("images", start)

	// Phase: cluster up.
	fmt.Fprintf(stdout, "==> cluster up (%s, cni %s)\n", *providerName, *cni)
	start = time.Now()
	var p provider
	switch *providerName {
	case "local":
		var c *local.Cluster
		c, err = local.Up(ctx, local.Config{
			RepoRoot: *repo, BinDir: *binDir, ClusterBinDir: *clusterBin,
			Images: archives, PauseArchive: pauseArchive, PauseRef: harness.PauseImageRef, Log: stdout,
			RegisterWithTaints: scenario.RegisterWithTaints, // the readiness gate's (issue 12)
			CNI:                *cni,
		})
		if c != nil {
			p = c
		}
	case "kind":
		var c *kind.Cluster
		c, err = kind.Up(ctx, kind.Config{RepoRoot: *repo, Images: archives, Log: stdout})
		if c != nil {
			p = c
		}
	}
	phase("cluster-up", start)
	if err != nil {
		fmt.Fprintln(stdout, "cluster-e2e:", err)
		return 1
	}

	// Phase: tests.
	start = time.Now()
	env := &scenario.Env{Cluster: p, Log: stdout, Install: *install}
	results := scenario.RunAll(ctx, env, list)
	phase("tests", start)
	if scenario.Failed(results) > 0 {
		diagnose(p, stdout)
	}

	// Phase: teardown.
	fmt.Fprintln(stdout, "==> teardown")
	start = time.Now()
	teardownErr := p.Close()
	phase("teardown", start)
	if teardownErr != nil {
		fmt.Fprintln(stdout, "cluster-e2e: teardown:", teardownErr)
	}

	fmt.Fprintln(stdout, "==> summary")
	if *providerName == "local" {
		fmt.Fprintf(stdout, "cni %s\ninstall %s\n", *cni, *install)
	}
	for _, l := range phases {
		fmt.Fprintln(stdout, l)
	}
	for _, r := range results {
		fmt.Fprintln(stdout, r)
	}
	if scenario.Failed(results) > 0 || teardownErr != nil || errors.Is(ctx.Err(), context.Canceled) {
		return 1
	}
	return 0
}

// diagnose prints what helps after a failure: pods, events, the DaemonSet's logs.
func diagnose(p provider, w io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fmt.Fprintln(w, "==> diagnostics")
	for _, args := range [][]string{
		{"get", "pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
		{"-n", "metaconceal-system", "logs", "-l", "app.kubernetes.io/name=metaconceal", "--all-containers", "--prefix", "--tail=40"},
	} {
		out, err := p.Kubectl(ctx, nil, args...)
		fmt.Fprintf(w, "---- kubectl %s\n%s", strings.Join(args, " "), out)
		if err != nil {
			fmt.Fprintln(w, err)
		}
	}
}

// envOr is the environment variable key, or def when it is unset or empty.
func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
