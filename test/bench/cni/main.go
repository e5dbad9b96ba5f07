// Command cni (make bench-cni) measures what the metaconceal plugin adds to pod
// network setup and teardown. On a simulated node (internal/testlib/simnode) it times `cnitool add`
// and `cnitool del` (process wall time, cnitool started inside the node netns) for
// three conflists, alternating pod by pod so that machine noise hits all three alike:
//
//	bridge       bridge + host-local
//	portmap      bridge + host-local + portmap (no mappings: a chained plugin that does nothing)
//	metaconceal  bridge + host-local + metaconceal (SECURE, default settings)
//
// and prints median and p90 per conflist and the metaconceal/portmap ratios (targets:
// ADD and DEL each at most 1.10). Everything it creates is removed on exit, also
// on Ctrl-C.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/gce"
)

type conflist struct {
	name   string // also the network name
	label  string
	chain  map[string]any // the plugin after bridge, nil for none
	adds   []time.Duration
	dels   []time.Duration
	counts map[string]map[string]int // verb -> "iptables" log value -> occurrences
	// inside holds the plugin's own durations from its log, by verb: the time from the
	// verb's start to its log line, without process start and libcni.
	inside map[string][]time.Duration
}

func main() {
	pods := flag.Int("pods", 20, "pods per conflist")
	warmup := flag.Int("warmup", 2, "untimed pods per conflist first (bridge creation, page cache)")
	backend := flag.String("iptables-backend", "auto", "metaconceal's iptablesBackend: auto, nft or legacy")
	flag.Parse()
	if err := run(*pods, *warmup, *backend); err != nil {
		fmt.Fprintln(os.Stderr, "bench-cni:", err)
		os.Exit(1)
	}
}

func run(pods, warmup int, backend string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces")
	}
	bin, err := testutil.BinDir()
	if err != nil {
		return err
	}
	for _, tool := range []string{"cnitool", "bridge", "host-local", "portmap", "metaconceal"} {
		if _, err := os.Stat(filepath.Join(bin, tool)); err != nil {
			return fmt.Errorf("%s missing in %s (run make build): %w", tool, bin, err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	tmp, err := os.MkdirTemp("", "mc-bench-cni-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	// The state dir lives where the plugin's default does, under /run.
	stateDir, err := os.MkdirTemp("/run", "metaconceal-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stateDir)

	node, err := simnode.New("mc-bench")
	if err != nil {
		return err
	}
	// Outstanding attachments are released through cnitool before the namespaces go,
	// so that no cnitool cache entry or IPAM lease outlives the run.
	outstanding := map[string]string{} // pod netns path -> network
	defer func() {
		for podPath, network := range outstanding {
			if _, _, derr := cnitool(context.Background(), node, bin, tmp, "del", network, podPath); derr != nil {
				err = errors.Join(err, derr)
			}
		}
		err = errors.Join(err, node.Close())
	}()
	// The proxy must accept connections for a realistic node; nothing is sent to it.
	ln, err := node.Listen("tcp", gce.Proxy.String())
	if err != nil {
		return err
	}
	defer ln.Close()

	lists := []*conflist{
		{name: "bench-bridge", label: "bridge"},
		{name: "bench-portmap", label: "bridge+portmap", chain: map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}}},
		{name: "bench-metaconceal", label: "bridge+metaconceal", chain: map[string]any{"type": "metaconceal", "stateDir": stateDir, "iptablesBackend": backend}},
	}
	for i, l := range lists {
		l.counts = map[string]map[string]int{"ADD": {}, "DEL": {}}
		l.inside = map[string][]time.Duration{}
		plugins := []map[string]any{{
			"type": "bridge", "bridge": fmt.Sprintf("mcbench%d", i), "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": fmt.Sprintf("10.97.%d.0/24", i)}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": filepath.Join(tmp, "ipam")},
		}}
		if l.chain != nil {
			plugins = append(plugins, l.chain)
		}
		data, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": l.name, "plugins": plugins})
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, l.name+".conflist"), data, 0o644); err != nil {
			return err
		}
	}

	fmt.Printf("bench-cni: %d pods per conflist (+%d warm-up), alternating; cnitool wall time inside the node netns %s; metaconceal iptablesBackend %s\n",
		pods, warmup, node.Name, backend)
	for i := range pods + warmup {
		timed := i >= warmup
		// Rotate the order so that no conflist always runs right after another.
		order := []*conflist{lists[i%3], lists[(i+1)%3], lists[(i+2)%3]}
		type pod struct {
			l          *conflist
			name, path string
		}
		var created []pod
		for _, l := range order {
			name, path, err := node.NewPodNS("mc-bench-pod")
			if err != nil {
				return err
			}
			d, logs, err := cnitool(ctx, node, bin, tmp, "add", l.name, path)
			if err != nil {
				return fmt.Errorf("%s add: %w", l.label, err)
			}
			outstanding[path] = l.name
			created = append(created, pod{l, name, path})
			if timed {
				l.adds = append(l.adds, d)
				countInvocations(l.counts["ADD"], logs)
				l.inside["ADD"] = append(l.inside["ADD"], loggedDurations(logs)...)
			}
		}
		for _, p := range created {
			d, logs, err := cnitool(ctx, node, bin, tmp, "del", p.l.name, p.path)
			if err != nil {
				return fmt.Errorf("%s del: %w", p.l.label, err)
			}
			delete(outstanding, p.path)
			if timed {
				p.l.dels = append(p.l.dels, d)
				countInvocations(p.l.counts["DEL"], logs)
				p.l.inside["DEL"] = append(p.l.inside["DEL"], loggedDurations(logs)...)
			}
			if err := simnode.DeleteNetns(p.name); err != nil {
				return err
			}
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
	}
	report(lists)
	return nil
}

// cnitool runs cnitool from a thread switched into the node netns, so that the wall
// time is cnitool's own (no `ip netns exec` in between), and returns it with stderr
// (the plugins' logs).
func cnitool(ctx context.Context, node *simnode.Node, bin, confDir, verb, network, podPath string) (time.Duration, string, error) {
	var elapsed time.Duration
	var stderr bytes.Buffer
	err := simnode.In(node.Path, func() error {
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "cnitool"), verb, network, podPath)
		cmd.Env = append(os.Environ(), "CNI_PATH="+bin, "NETCONFPATH="+confDir,
			"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME="+filepath.Base(podPath))
		cmd.Stderr = &stderr
		start := time.Now()
		err := cmd.Run()
		elapsed = time.Since(start)
		if err != nil {
			return fmt.Errorf("cnitool %s %s %s: %w: %s", verb, network, podPath, err, strings.TrimSpace(stderr.String()))
		}
		return nil
	})
	return elapsed, stderr.String(), err
}

var iptablesLog = regexp.MustCompile(`plugin=metaconceal verb=\S+ .*iptables="?([^" ]*)"?`)

func countInvocations(into map[string]int, logs string) {
	for _, m := range iptablesLog.FindAllStringSubmatch(logs, -1) {
		v := m[1]
		if v == "" {
			v = "none"
		}
		into[v]++
	}
}

var durationLog = regexp.MustCompile(`plugin=metaconceal .* duration=(\S+)`)

func loggedDurations(logs string) []time.Duration {
	var out []time.Duration
	for _, m := range durationLog.FindAllStringSubmatch(logs, -1) {
		if d, err := time.ParseDuration(m[1]); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// percentile is the nearest-rank percentile of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	idx := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(idx, 0)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%6.1f ms", float64(d.Microseconds())/1000) }

func report(lists []*conflist) {
	fmt.Printf("\n%-20s %10s %10s   %10s %10s\n", "conflist", "ADD p50", "ADD p90", "DEL p50", "DEL p90")
	for _, l := range lists {
		fmt.Printf("%-20s %10s %10s   %10s %10s\n", l.label, ms(percentile(l.adds, 50)), ms(percentile(l.adds, 90)),
			ms(percentile(l.dels, 50)), ms(percentile(l.dels, 90)))
	}
	pm, mc := lists[1], lists[2]
	ratio := func(a, b []time.Duration, p float64) float64 {
		return float64(percentile(a, p)) / float64(percentile(b, p))
	}
	fmt.Printf("\nmetaconceal/portmap  ADD p50 %.3fx  p90 %.3fx   DEL p50 %.3fx  p90 %.3fx   (targets: ADD and DEL <= 1.10x)\n",
		ratio(mc.adds, pm.adds, 50), ratio(mc.adds, pm.adds, 90), ratio(mc.dels, pm.dels, 50), ratio(mc.dels, pm.dels, 90))
	for _, verb := range []string{"ADD", "DEL"} {
		var parts []string
		for k, n := range mc.counts[verb] {
			parts = append(parts, fmt.Sprintf("%s (x%d)", k, n))
		}
		slices.Sort(parts)
		fmt.Printf("metaconceal %s iptables processes per call, from its log: %s", verb, strings.Join(parts, ", "))
		if in := mc.inside[verb]; len(in) > 0 {
			fmt.Printf("; time inside the plugin p50 %s p90 %s", strings.TrimSpace(ms(percentile(in, 50))), strings.TrimSpace(ms(percentile(in, 90))))
		}
		fmt.Println()
	}
}
