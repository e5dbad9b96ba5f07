//go:build e2e

package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/cniplugin"
	"github.com/metaconceal/metaconceal/pkg/cri"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/repair"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// TestRepairPreexistingPods starts pods on a real containerd while the node's conflist
// has no metaconceal entry (a cluster that installs metaconceal later), then adds the
// entry and runs the repair: report mode counts and reports without touching anything;
// repair mode installs rules and records through the plugin's own ADD, which the
// plugin's CHECK then accepts, and the runtime's DEL later removes as for any pod.
func TestRepairPreexistingPods(t *testing.T) {
	testutil.RequirePrivileged(t, "containerd", "runc", "ctr", "ip", "nsenter", "iptables", "iptables-save", "iptables-restore")
	ctx := context.Background()
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := testutil.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	node, err := simnode.New("mc-repair")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("remove netns: %v", err)
		}
	})
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	pauseBin, err := harness.BuildPauseBinary(ctx, root, dir)
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "pause.tar")
	if err := harness.WritePauseArchive(pauseBin, archive, harness.PauseImageRef); err != nil {
		t.Fatal(err)
	}
	network := "mc-repair-" + simnode.RandomSuffix()
	mainCNI := map[string]any{
		"cniVersion": "1.0.0", "name": network,
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": "mcrep0", "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "subnet": "10.88.71.0/24", "dataDir": filepath.Join(dir, "ipam"),
				"routes": []any{map[string]any{"dst": "0.0.0.0/0"}}},
		}},
	}
	before, err := json.Marshal(mainCNI)
	if err != nil {
		t.Fatal(err)
	}
	rtDir := filepath.Join(dir, "rt")
	if err := os.MkdirAll(rtDir, 0o755); err != nil {
		t.Fatal(err)
	}
	rt, err := harness.Start(ctx, harness.Config{
		Node: node, Dir: rtDir,
		CNIBinaries: map[string]string{
			"bridge": filepath.Join(bin, "bridge"), "host-local": filepath.Join(bin, "host-local"),
			"loopback": filepath.Join(bin, "loopback"), "metaconceal": filepath.Join(bin, "metaconceal"),
		},
		CNIConflist: before, NetworkName: network, PauseArchive: archive, CrictlPath: filepath.Join(bin, "crictl"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", harness.Tail(rt.LogPath, 30))
		}
		if err := rt.Close(); err != nil {
			t.Errorf("stop containerd: %v", err)
		}
	})

	// Pods that predate metaconceal: a tenant pod, one in an excluded namespace, and
	// a hostNetwork pod (no netns, never CNI).
	web, err := rt.RunPod(ctx, harness.PodSpec{Name: "web", Namespace: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	dns, err := rt.RunPod(ctx, harness.PodSpec{Name: "dns", Namespace: "kube-system"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rt.RunPod(ctx, harness.PodSpec{Name: "agent", Namespace: "shop", HostNetwork: true}); err != nil {
		t.Fatal(err)
	}

	// The installer puts the entry in (as metaconceal-install does), after the fact.
	mainCNI["plugins"] = append(mainCNI["plugins"].([]any), map[string]any{
		"type": "metaconceal", "mode": "SECURE", "proxy": "169.254.169.252:988",
		"stateDir": stateDir, "excludeNamespaces": []string{"kube-system"},
	})
	after, err := json.Marshal(mainCNI)
	if err != nil {
		t.Fatal(err)
	}
	confDir := filepath.Join(rtDir, "cni-conf")
	tmp := filepath.Join(confDir, ".entry.tmp")
	if err := os.WriteFile(tmp, after, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(confDir, "10-metaconceal-e2e.conflist")); err != nil {
		t.Fatal(err)
	}

	runtime, err := cri.Dial(ctx, rt.Socket, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer runtime.Close()
	sink := &eventLog{}
	reg := prometheus.NewRegistry()
	metrics := repair.NewMetrics(reg)
	newRepairer := func(mode repair.Mode) *repair.Repairer {
		r, err := repair.New(repair.Config{Mode: mode, Sandboxes: runtime, ConfDir: confDir, StateDir: stateDir,
			Events: sink, Metrics: metrics, PluginLog: io.Discard, Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	// The agent runs in the node's netns (hostNetwork): the host-side veth is found there.
	scan := func(r *repair.Repairer) repair.Result {
		t.Helper()
		var res repair.Result
		err := simnode.In(node.Path, func() error {
			var err error
			res, err = r.Scan(ctx)
			return err
		})
		if err != nil {
			t.Fatalf("scan: %v", err)
		}
		return res
	}

	// report: the tenant pod is unprotected (the excluded one is exposed by design, the
	// hostNetwork one has no CNI); nothing is written.
	res := scan(newRepairer(repair.ModeReport))
	if res.Sandboxes != 3 || len(res.Unprotected) != 1 || res.Unprotected[0].ID != web || len(res.Repaired) != 0 {
		t.Fatalf("report scan: %+v; want web unprotected, nothing repaired", res)
	}
	if g := gauge(t, reg, "metaconceal_unprotected_pods"); g != 1 {
		t.Errorf("unprotected gauge %v after report, want 1", g)
	}
	if recs, _ := state.List(stateDir); len(recs) != 0 {
		t.Errorf("report mode wrote records: %+v", recs)
	}
	if !sink.has("shop/web", podevents.ReasonUnprotected) {
		t.Errorf("no MetadataUnprotected Event on shop/web: %v", sink.all())
	}

	// repair: both pods get what ADD would have given them.
	res = scan(newRepairer(repair.ModeRepair))
	if len(res.Repaired) != 2 || len(res.Unprotected) != 0 || len(res.Failed) != 0 {
		t.Fatalf("repair scan: %+v; want web and dns repaired", res)
	}
	if g := gauge(t, reg, "metaconceal_unprotected_pods"); g != 0 {
		t.Errorf("unprotected gauge %v after repair, want 0", g)
	}
	if !sink.has("shop/web", podevents.ReasonRepaired) || sink.has("kube-system/dns", podevents.ReasonRepaired) {
		t.Errorf("Events %v: want MetadataRepaired on shop/web only (kube-system is exposed by design)", sink.all())
	}
	pc, err := repair.LoadPluginConf(confDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range res.Repaired {
		rec, err := state.Read(stateDir, sb.ID, repair.DefaultIfName)
		if err != nil {
			t.Fatalf("%s: %v", sb, err)
		}
		if rec.PodNamespace != sb.Namespace || rec.PodName != sb.Name || rec.PodUID != sb.UID || rec.Network != network ||
			strings.Join(rec.IPs, ",") != strings.Join(sb.IPs, ",") || rec.HostIf == "" || rec.Exposed != (sb.ID == dns) {
			t.Errorf("%s: record %+v", sb, rec)
		}
		// The plugin's own CHECK, given what the runtime would pass, accepts the rules
		// and the record: the repair did exactly what ADD does.
		err = simnode.In(node.Path, func() error {
			hostIf, err := repair.HostVeth(sb.Netns, repair.DefaultIfName)
			if err != nil {
				return err
			}
			args, err := pc.AddArgs(sb, repair.DefaultIfName, hostIf)
			if err != nil {
				return err
			}
			return (&cniplugin.Plugin{Stdout: io.Discard, Stderr: io.Discard}).Check(args)
		})
		if err != nil {
			t.Errorf("%s: the plugin's CHECK after repair: %v", sb, err)
		}
	}

	// Idempotent: a second scan finds nothing.
	if res := scan(newRepairer(repair.ModeRepair)); len(res.Repaired) != 0 || len(res.Unprotected) != 0 {
		t.Errorf("second scan: %+v; want nothing to do", res)
	}

	// The periodic loop: the main CNI rewrites its config without the entry (as during a
	// containerd restart with a CNI that regenerates its file), a pod starts meanwhile
	// and gets no rules; once the entry is back, the running loop repairs it within a
	// period.
	writeConflist := func(data []byte) {
		t.Helper()
		if err := os.WriteFile(tmp, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(confDir, "10-metaconceal-e2e.conflist")); err != nil {
			t.Fatal(err)
		}
	}
	writeConflist(before)
	late, err := rt.RunPod(ctx, harness.PodSpec{Name: "late", Namespace: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := state.Read(stateDir, late, repair.DefaultIfName); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("pod started without the entry has a record: %v", err)
	}
	writeConflist(after)
	loopCtx, stopLoop := context.WithCancel(ctx)
	loop, err := repair.New(repair.Config{Mode: repair.ModeRepair, Sandboxes: runtime, ConfDir: confDir, StateDir: stateDir,
		Interval: 200 * time.Millisecond, Events: sink, Metrics: metrics, PluginLog: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	loopDone := make(chan error, 1)
	go func() { loopDone <- simnode.In(node.Path, func() error { return loop.Run(loopCtx) }) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := state.Read(stateDir, late, repair.DefaultIfName); err == nil {
			break
		}
		if time.Now().After(deadline) {
			stopLoop()
			t.Fatal("the repair loop did not repair the late pod within 10s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	stopLoop()
	if err := <-loopDone; err != nil {
		t.Errorf("repair loop: %v", err)
	}
	if !sink.has("shop/late", podevents.ReasonRepaired) {
		t.Errorf("no MetadataRepaired Event on shop/late: %v", sink.all())
	}

	// The runtime's DEL (now through the conflist with the entry) takes the repaired
	// pod's rules and record away like any other pod's.
	if err := rt.RemovePod(ctx, web); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Read(stateDir, web, repair.DefaultIfName); !errors.Is(err, state.ErrNotFound) {
		t.Errorf("record of the removed pod: %v; want it gone", err)
	}
}

func gauge(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

// eventLog records what the repair would send as Events (the Event path itself is
// proven against the API server by TestPodEvents).
type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (l *eventLog) Emit(pod podevents.Pod, eventType, reason, message string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, pod.Namespace+"/"+pod.Name+" "+eventType+" "+reason+": "+message)
}

func (l *eventLog) has(pod, reason string) bool {
	for _, e := range l.all() {
		if strings.HasPrefix(e, pod+" ") && strings.Contains(e, " "+reason+": ") {
			return true
		}
	}
	return false
}

func (l *eventLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.events...)
}
