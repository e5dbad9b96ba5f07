// Package scenario holds the cluster end-to-end checks of metaconceal: one list of
// scenarios that runs against any cluster provider (the local one-node cluster of
// test/cluster/local, `make cluster-e2e`; kind, test/kind, `make kind-e2e`).
//
// A run goes: every scenario's Prepare (before metaconceal is installed: pods that
// predate the DaemonSet), then the install (`kubectl apply -k` of the provider's deploy
// dir, as a user would), then every scenario's Run in list order. The uninstall
// scenario is last: it takes metaconceal away. Each scenario prints one summary line
//
//	scenario <name> PASS|FAIL <seconds>s <one-line detail>
//
// Adding a scenario is adding an entry to List (see scenarios.go).
package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Cluster is what a provider gives the scenarios: a kubectl that reaches the API
// server, a way to run commands and read files on a node (in the node's network
// namespace and filesystem), and where the node-specific things are.
type Cluster interface {
	// Kubectl runs kubectl against the cluster (admin credentials) and returns its
	// stdout; the error carries stderr. stdin may be nil.
	Kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error)
	// Nodes lists the node names that run workloads.
	Nodes() []string
	// NodeExec runs a command on a node: its network namespace and its filesystem.
	NodeExec(ctx context.Context, node string, args ...string) ([]byte, error)
	// NodeReadFile reads a file on a node (paths as the node sees them).
	NodeReadFile(ctx context.Context, node, path string) ([]byte, error)
	// Paths names the node's CNI conf dir and the plugin's state dir (node paths).
	Paths() NodePaths
	// DeployDir is the kustomize dir of `kubectl apply -k` (conf/deploy, or an
	// overlay of it that changes only the image reference and node-specific paths);
	// UninstallDir is the same for conf/deploy/uninstall.
	DeployDir() string
	UninstallDir() string
	// Images names the images the provider made available on every node.
	Images() Images
}

// NodePaths are node-side locations the checks look at.
type NodePaths struct {
	CNIConfDir string // the main CNI's conf dir (the installer patches its primary file)
	CNIBinDir  string // where the installer copies the plugin
	StateDir   string // the plugin's state records
}

// Images are the image references loaded into every node.
type Images struct {
	Metaconceal string // the production image the deploy dir names (e.g. metaconceal:dev)
	Update      string // the same programs under a new tag, for the rolling update
	Probe       string // the test workload: busybox shell plus /probe
}

// Env is one run's shared state between scenarios.
type Env struct {
	Cluster Cluster
	Log     io.Writer // progress lines (not the summary)
	// Install is how metaconceal is installed and uninstalled: InstallKubectl (the
	// default when empty) or InstallHelm (helm.go).
	Install string

	// Set by Install: the primary conflist of each node before metaconceal touched it.
	ConflistBefore map[string]NodeFile
}

// NodeFile is a file on a node and its bytes.
type NodeFile struct {
	Path string
	Data []byte
}

// Logf writes one progress line.
func (e *Env) Logf(format string, args ...any) {
	fmt.Fprintf(e.Log, "    "+format+"\n", args...)
}

// Scenario is one named check.
type Scenario struct {
	Name string
	// Prepare runs before metaconceal is installed (optional).
	Prepare func(ctx context.Context, env *Env) error
	// Run checks and returns a one-line detail for the summary; an error fails it.
	Run func(ctx context.Context, env *Env) (detail string, err error)
	// Timeout bounds Prepare and Run together (default 3 minutes).
	Timeout time.Duration
}

// Result is one summary line.
type Result struct {
	Name    string
	Pass    bool
	Elapsed time.Duration
	Detail  string
}

// String is the summary line: `scenario <name> PASS|FAIL <seconds>s <detail>`.
func (r Result) String() string {
	verdict := "FAIL"
	if r.Pass {
		verdict = "PASS"
	}
	detail := strings.Join(strings.Fields(r.Detail), " ")
	if detail == "" {
		detail = "-"
	}
	return fmt.Sprintf("scenario %s %s %.1fs %s", r.Name, verdict, r.Elapsed.Seconds(), detail)
}

// Select returns the scenarios of list whose names are in names (all when names is
// empty), in list order; an unknown name is an error.
func Select(list []Scenario, names []string) ([]Scenario, error) {
	if len(names) == 0 {
		return list, nil
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	var out []Scenario
	for _, s := range list {
		if want[s.Name] {
			out = append(out, s)
			delete(want, s.Name)
		}
	}
	if len(want) > 0 {
		var unknown []string
		for n := range want {
			unknown = append(unknown, n)
		}
		return nil, fmt.Errorf("unknown scenario(s) %s; known: %s", strings.Join(unknown, ", "), strings.Join(Names(list), ", "))
	}
	return out, nil
}

// Names lists the scenario names in order.
func Names(list []Scenario) []string {
	names := make([]string, len(list))
	for i, s := range list {
		names[i] = s.Name
	}
	return names
}

// RunAll prepares every scenario, installs metaconceal, runs every scenario and
// returns one result per scenario plus one for the install itself. A scenario whose
// Prepare failed is reported failed without running; when the install fails, every
// scenario fails with that reason.
func RunAll(ctx context.Context, env *Env, list []Scenario) []Result {
	prepErr := map[string]error{}
	for _, s := range list {
		if s.Prepare == nil {
			continue
		}
		fmt.Fprintf(env.Log, "==> prepare %s\n", s.Name)
		sctx, cancel := context.WithTimeout(ctx, timeout(s))
		prepErr[s.Name] = s.Prepare(sctx, env)
		cancel()
	}

	var results []Result
	if env.Install == InstallHelm {
		fmt.Fprintf(env.Log, "==> install (helm install %s)\n", helmRelease)
	} else {
		fmt.Fprintf(env.Log, "==> install (kubectl apply -k %s)\n", env.Cluster.DeployDir())
	}
	start := time.Now()
	detail, installErr := Install(ctx, env)
	results = append(results, result("install", start, detail, installErr))

	for _, s := range list {
		fmt.Fprintf(env.Log, "==> scenario %s\n", s.Name)
		start := time.Now()
		var detail string
		var err error
		switch {
		case ctx.Err() != nil:
			err = fmt.Errorf("not run: %w", ctx.Err())
		case installErr != nil:
			err = fmt.Errorf("not run: install failed")
		case prepErr[s.Name] != nil:
			err = fmt.Errorf("prepare: %w", prepErr[s.Name])
		default:
			sctx, cancel := context.WithTimeout(ctx, timeout(s))
			detail, err = s.Run(sctx, env)
			cancel()
		}
		r := result(s.Name, start, detail, err)
		fmt.Fprintf(env.Log, "    %s\n", r)
		results = append(results, r)
	}
	return results
}

func timeout(s Scenario) time.Duration {
	if s.Timeout > 0 {
		return s.Timeout
	}
	return 3 * time.Minute
}

func result(name string, start time.Time, detail string, err error) Result {
	r := Result{Name: name, Pass: err == nil, Elapsed: time.Since(start), Detail: detail}
	if err != nil {
		r.Detail = err.Error()
		if detail != "" {
			r.Detail = detail + ": " + err.Error()
		}
	}
	return r
}

// Failed counts the failed results.
func Failed(results []Result) int {
	n := 0
	for _, r := range results {
		if !r.Pass {
			n++
		}
	}
	return n
}

// errf is fmt.Errorf for scenario failures.
var errf = fmt.Errorf

var errNoNodes = errors.New("the provider reports no nodes")
