package scenario

// Fault drills on a live node (issue 18): the proxy killed, containerd and the kubelet
// restarted while pods are being created, the node rebooted. Each ends with every
// workload pod concealed (kube-env asked from inside each pod) and the node agent's
// metaconceal_unprotected_pods 0 after a repair scan that started after the fault.
// They need a provider that can stop and start the node's processes (NodeFaults: the
// local provider); on another one they fail saying so.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/pkg/nodegate"
)

// NodeFaults is what a provider offers the fault drills: the node's runtime and
// kubelet stopped and started (the pods keep running, as under systemd), a container's
// main process killed, and a reboot in two halves: Shutdown stops every node process
// (pods included) and empties what a reboot empties (tmpfs state, the node's rules and
// the addresses the project added); Boot starts the node's processes again.
type NodeFaults interface {
	StopContainerd(ctx context.Context, node string) error
	StartContainerd(ctx context.Context, node string) error
	StopKubelet(ctx context.Context, node string) error
	StartKubelet(ctx context.Context, node string) error
	// KillContainer sends SIGKILL to the main process of a container and returns its
	// pid and command line.
	KillContainer(ctx context.Context, node, ns, pod, container string) (pid int, cmdline string, err error)
	Shutdown(ctx context.Context, node string) error
	Boot(ctx context.Context, node string) error
}

func nodeFaults(env *Env) (NodeFaults, error) {
	f, ok := env.Cluster.(NodeFaults)
	if !ok {
		return nil, errf("the %T provider cannot stop and start node processes (scenario.NodeFaults): the fault drills run on the local provider", env.Cluster)
	}
	return f, nil
}

// faultDown is how long a restarted component stays down.
const faultDown = 2 * time.Second

var drillProberManifest = namespaceDoc("{{.WorkloadNamespace}}") +
	probePod("drill-prober", "{{.WorkloadNamespace}}", probeSpec{Command: `["/probe", "loop", "-interval", "50ms", "{{.URL}}"]`})

// proxyKilled: while a pod asks for kube-env every 50 ms, the proxy's process gets
// SIGKILL (found through the CRI by its pod and container). Until the kubelet has
// restarted it the pod gets refused connections (fail closed), never kube-env and no
// other answer; the detail gives the time until concealed answers resume.
func proxyKilled(ctx context.Context, env *Env) (string, error) {
	f, err := nodeFaults(env)
	if err != nil {
		return "", err
	}
	if err := apply(ctx, env, drillProberManifest, map[string]string{"URL": kubeEnvURL}); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=drill-prober", 2*time.Minute); err != nil {
		return "", err
	}
	node, err := podNode(ctx, env, WorkloadNamespace, "drill-prober")
	if err != nil {
		return "", err
	}
	ds, restarts, err := proxyPod(ctx, env, node)
	if err != nil {
		return "", err
	}
	time.Sleep(time.Second) // answers before the kill, so the window has a start
	kill := time.Now()
	pid, cmd, err := f.KillContainer(ctx, node, deployNamespace, ds, "proxy")
	if err != nil {
		return "", err
	}
	if !strings.Contains(cmd, "metaconceal-proxy") {
		return "", errf("killed pid %d is %q, not the proxy", pid, cmd)
	}
	// The kubelet restarts the container; then answers resume.
	if err := poll(ctx, 2*time.Minute, func() error {
		_, now, err := proxyPod(ctx, env, node)
		if err == nil && now <= restarts {
			err = errf("proxy container of %s not restarted yet (restarts %d)", ds, now)
		}
		return err
	}); err != nil {
		return "", err
	}
	if _, err := kubectl(ctx, env, nil, "-n", deployNamespace, "wait", "--for=condition=Ready", "pod/"+ds, "--timeout=120s"); err != nil {
		return "", err
	}
	var st probeStats
	var resume time.Duration
	if err := poll(ctx, time.Minute, func() error {
		out, err := kubectl(ctx, env, nil, "-n", WorkloadNamespace, "logs", "drill-prober")
		if err != nil {
			return err
		}
		if st, err = analyzeProbeLog(out, kill.UnixMilli()); err != nil {
			return err
		}
		var ok bool
		if resume, ok = resumedAfter(out, kill); !ok {
			return errf("no concealed answer since the kill yet (%s)", st)
		}
		return nil
	}); err != nil {
		return "", err
	}
	detail := fmt.Sprintf("proxy pid %d SIGKILLed; concealed answers resumed %.2fs after the kill; %s", pid, resume.Seconds(), st)
	switch {
	case st.leaks > 0:
		return detail, errf("%d answers carried kube-env", st.leaks)
	case st.other > 0:
		return detail, errf("%d answers were neither concealed nor refused (last %s)", st.other, st.last)
	}
	end, err := faultEnd(ctx, env, kill)
	if err != nil {
		return detail, err
	}
	if _, err := kubectl(ctx, env, nil, "-n", WorkloadNamespace, "delete", "pod", "drill-prober", "--wait=false"); err != nil {
		return detail, err
	}
	return detail + "; " + end, nil
}

// resumedAfter is the time from t to the first concealed answer after the last
// answer that was not concealed (0 when every answer since t was concealed); ok is
// false while the last answer is not concealed.
func resumedAfter(log []byte, t time.Time) (time.Duration, bool) {
	since := t.UnixMilli()
	resumeAt, concealed, seen := since, true, false
	for _, raw := range bytes.Split(log, []byte("\n")) {
		var l probeLine
		if json.Unmarshal(bytes.TrimSpace(raw), &l) != nil || l.T < since {
			continue
		}
		seen = true
		switch {
		case !l.concealed():
			concealed = false
		case !concealed:
			concealed, resumeAt = true, l.T
		}
	}
	return time.Duration(resumeAt-since) * time.Millisecond, seen && concealed
}

// proxyPod is the DaemonSet's pod on node and its proxy container's restart count.
func proxyPod(ctx context.Context, env *Env, node string) (string, int, error) {
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "get", "pods", "-l", "app.kubernetes.io/name=metaconceal",
		"--field-selector", "spec.nodeName="+node, "-o", "json")
	if err != nil {
		return "", 0, err
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name              string  `json:"name"`
				DeletionTimestamp *string `json:"deletionTimestamp"`
			} `json:"metadata"`
			Status struct {
				ContainerStatuses []struct {
					Name         string `json:"name"`
					RestartCount int    `json:"restartCount"`
				} `json:"containerStatuses"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return "", 0, fmt.Errorf("decode pods: %w", err)
	}
	var names []string
	restarts := 0
	for _, it := range list.Items {
		if it.Metadata.DeletionTimestamp != nil {
			continue
		}
		names = append(names, it.Metadata.Name)
		for _, cs := range it.Status.ContainerStatuses {
			if cs.Name == "proxy" {
				restarts = cs.RestartCount
			}
		}
	}
	if len(names) != 1 {
		return "", 0, errf("node %s: %d metaconceal pods (%v), want 1", node, len(names), names)
	}
	return names[0], restarts, nil
}

var containerdDrillManifest = namespaceDoc("{{.WorkloadNamespace}}") + probeDeployment("containerd-drill", "{{.WorkloadNamespace}}", 5, probeSpec{})

// containerdRestart: a Deployment of 5 pods is applied and, as soon as the first is
// bound to the node, containerd is stopped and started again; all 5 end up Running,
// recorded (their ADD ran through metaconceal) and concealed.
func containerdRestart(ctx context.Context, env *Env) (string, error) {
	f, err := nodeFaults(env)
	if err != nil {
		return "", err
	}
	if err := apply(ctx, env, containerdDrillManifest, nil); err != nil {
		return "", err
	}
	node, err := firstBound(ctx, env, "app=containerd-drill", 0)
	if err != nil {
		return "", err
	}
	down := time.Now()
	if err := f.StopContainerd(ctx, node); err != nil {
		return "", err
	}
	time.Sleep(faultDown)
	if err := f.StartContainerd(ctx, node); err != nil {
		return "", err
	}
	up := time.Now()
	n, ready, err := drillPodsConcealed(ctx, env, "app=containerd-drill", 5)
	if err != nil {
		return "", err
	}
	detail := fmt.Sprintf("containerd down %.1fs while 5 pods were being created; %d Running, recorded and concealed %.1fs after it came back",
		up.Sub(down).Seconds(), n, ready.Sub(up).Seconds())
	end, err := faultEnd(ctx, env, up)
	if err != nil {
		return detail, err
	}
	return detail + "; " + end, nil
}

var kubeletDrillManifest = namespaceDoc("{{.WorkloadNamespace}}") + probeDeployment("kubelet-drill", "{{.WorkloadNamespace}}", 1, probeSpec{})

// kubeletRestart: a Deployment of 1 is scaled to 5 and, as soon as a new pod is bound
// to the node, the kubelet is stopped and started again; all replicas end up Running,
// recorded and concealed.
func kubeletRestart(ctx context.Context, env *Env) (string, error) {
	f, err := nodeFaults(env)
	if err != nil {
		return "", err
	}
	if err := apply(ctx, env, kubeletDrillManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=kubelet-drill", 2*time.Minute); err != nil {
		return "", err
	}
	if _, err := kubectl(ctx, env, nil, "-n", WorkloadNamespace, "scale", "deployment/kubelet-drill", "--replicas=5"); err != nil {
		return "", err
	}
	node, err := firstBound(ctx, env, "app=kubelet-drill", 1)
	if err != nil {
		return "", err
	}
	down := time.Now()
	if err := f.StopKubelet(ctx, node); err != nil {
		return "", err
	}
	time.Sleep(faultDown)
	if err := f.StartKubelet(ctx, node); err != nil {
		return "", err
	}
	up := time.Now()
	n, ready, err := drillPodsConcealed(ctx, env, "app=kubelet-drill", 5)
	if err != nil {
		return "", err
	}
	detail := fmt.Sprintf("kubelet down %.1fs while the Deployment scaled 1->5; %d replicas Running, recorded and concealed %.1fs after it came back",
		up.Sub(down).Seconds(), n, ready.Sub(up).Seconds())
	end, err := faultEnd(ctx, env, up)
	if err != nil {
		return detail, err
	}
	return detail + "; " + end, nil
}

// nodeReboot: the node's processes stop (pods included) and what a reboot empties is
// emptied (Shutdown); it boots. The Node object stays, as in a reboot, so the
// kubelet's --register-with-taints does not apply again: the node agent, finding no
// marker in its tmpfs state dir, must put the readiness taint back when its first
// step finds metaconceal not protecting the node yet (nodegate's CloseAtStart), or
// find every check passing. A taint seen on the node must be the agent's (its log);
// it must be gone once the proxy is ready, and every workload pod must run again in a new sandbox (its
// state record, emptied with /run, written anew by the plugin's ADD or the repair)
// and be concealed.
func nodeReboot(ctx context.Context, env *Env) (string, error) {
	f, err := nodeFaults(env)
	if err != nil {
		return "", err
	}
	nodes := env.Cluster.Nodes()
	if len(nodes) == 0 {
		return "", errNoNodes
	}
	node := nodes[0]
	before, err := workloadPods(ctx, env)
	if err != nil {
		return "", err
	}
	start := time.Now()
	if err := f.Shutdown(ctx, node); err != nil {
		return "", err
	}
	down := time.Since(start)
	boot := time.Now()
	// Look at the node's taints from the start of the boot until they are gone again.
	looks, stopLooking := context.WithCancel(ctx)
	defer stopLooking()
	taints := make(chan taintTimes, 1)
	go func() { taints <- watchTaint(looks, env, node, boot) }()
	if err := f.Boot(ctx, node); err != nil {
		return "", err
	}
	booted := time.Since(boot)
	// The node agent restarted by the kubelet decides at its first step: it taints
	// the node when metaconceal does not protect it yet (nodegate's CloseAtStart:
	// no marker since the boot), or finds every check passing and leaves it open.
	var agentLog string
	var agentAt time.Duration
	if err := poll(ctx, 3*time.Minute, func() error {
		started, err := agentStarted(ctx, env, node)
		if err != nil {
			return err
		}
		if !started.After(boot) {
			return errf("the node agent has not started again since the boot")
		}
		agentAt = started.Sub(boot)
		out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "logs", "-l", "app.kubernetes.io/name=metaconceal", "-c", "keep-entry", "--tail=-1")
		if err != nil {
			return err
		}
		if agentLog = string(out); !strings.Contains(agentLog, gateClosedAtBoot) && !strings.Contains(agentLog, gateOpen) {
			return errf("the node agent's readiness gate has not decided yet")
		}
		if err := proxyReady(ctx, env, node); err != nil {
			return err
		}
		t, err := nodeTainted(ctx, env, node)
		if err == nil && t {
			err = errf("node %s still carries %s", node, nodegate.TaintKey)
		}
		return err
	}); err != nil {
		return "", err
	}
	untainted := time.Since(boot)
	stopLooking()
	seen := <-taints
	if seen.on > 0 && seen.off == 0 {
		seen.off = untainted // the check above saw it gone before the watcher's next look
	}
	closedAtStart := strings.Contains(agentLog, gateClosedAtBoot)
	var taintDetail string
	switch {
	case seen.on > 0 && !closedAtStart:
		return "", errf("node %s carried %s after the boot but its agent's log does not say it closed the gate", node, nodegate.TaintKey)
	case seen.on > 0:
		taintDetail = fmt.Sprintf("the node agent (started %.1fs after boot start) put %s back: seen %.1fs, gone %.1fs after boot start (%d looks)",
			agentAt.Seconds(), nodegate.TaintKey, seen.on.Seconds(), seen.off.Seconds(), seen.looks)
	case closedAtStart:
		taintDetail = fmt.Sprintf("the node agent (started %.1fs after boot start) put %s back and took it away between two looks (its log; %d looks)",
			agentAt.Seconds(), nodegate.TaintKey, seen.looks)
	default:
		// Its first step found the node protected (the proxy ready, its guard in
		// place, the plugin in the conflist): nothing to close.
		taintDetail = fmt.Sprintf("the node agent (started %.1fs after boot start) found the node protected at its first step: no taint needed (%d looks, none tainted)",
			agentAt.Seconds(), seen.looks)
	}
	pods, err := allWorkloadsConcealed(ctx, env, true)
	if err != nil {
		return "", err
	}
	if len(pods) < len(before) {
		return "", errf("%d workload pods after the reboot, %d before", len(pods), len(before))
	}
	concealedAt := time.Since(boot)
	detail := fmt.Sprintf("shutdown %.1fs; boot %.1fs; Node object kept; %s; proxy ready and untainted %.1fs after boot start; %d workload pods in new sandboxes, recorded and concealed %.1fs after boot start",
		down.Seconds(), booted.Seconds(), taintDetail, untainted.Seconds(), len(pods), concealedAt.Seconds())
	// Pods the kubelet restarts do not wait for the proxy: until it is ready they get
	// no answer, and until it has put the host guard back nothing but their own rules
	// stands between them and the metadata server. Say how long that was.
	if lead, err := podsBeforeProxy(ctx, env, node, pods); err == nil {
		detail += "; " + lead
	} else {
		detail += "; (start times: " + err.Error() + ")"
	}
	end, err := waitUnprotectedZero(ctx, env, boot)
	if err != nil {
		return detail, err
	}
	return detail + "; " + end, nil
}

// proxyReady asks the proxy's /readyz on node.
func proxyReady(ctx context.Context, env *Env, node string) error {
	_, err := env.Cluster.NodeExec(ctx, node, "curl", "-sSf", "--max-time", "5", "http://127.0.0.1:989/readyz")
	return err
}

// firstBound waits until more than already pods matching selector are bound to a
// node (the kubelet is about to start them) and returns that node.
func firstBound(ctx context.Context, env *Env, selector string, already int) (string, error) {
	var node string
	err := poll(ctx, time.Minute, func() error {
		pods, err := podJSON(ctx, env, WorkloadNamespace, selector)
		if err != nil {
			return err
		}
		bound := 0
		for _, p := range pods {
			if p.Spec.NodeName != "" {
				bound++
				node = p.Spec.NodeName
			}
		}
		if bound <= already {
			return errf("%d pods with %s bound to a node, waiting for more than %d", bound, selector, already)
		}
		return nil
	})
	return node, err
}

// drillPodsConcealed waits until want pods matching selector are Ready, then wants
// each recorded and concealed; it returns their number and when they were all Ready.
func drillPodsConcealed(ctx context.Context, env *Env, selector string, want int) (int, time.Time, error) {
	var names []string
	if err := poll(ctx, 3*time.Minute, func() error {
		var err error
		if names, err = waitPodsReady(ctx, env, WorkloadNamespace, selector, 2*time.Minute); err == nil && len(names) != want {
			err = errf("%d pods with %s Ready, want %d", len(names), selector, want)
		}
		return err
	}); err != nil {
		return 0, time.Time{}, err
	}
	ready := time.Now()
	for _, p := range names {
		if err := concealedAndRecorded(ctx, env, WorkloadNamespace, p); err != nil {
			return 0, ready, err
		}
	}
	return len(names), ready, nil
}

// concealedAndRecorded: the pod has a state record on its node and kube-env asked
// from inside it gets the concealed answer.
func concealedAndRecorded(ctx context.Context, env *Env, ns, pod string) error {
	node, err := podNode(ctx, env, ns, pod)
	if err != nil {
		return err
	}
	var ok bool
	if err := poll(ctx, repairPeriod+30*time.Second, func() error {
		_, ok, err = findRecord(ctx, env, node, ns, pod)
		if err == nil && !ok {
			err = errf("no state record for %s/%s on %s", ns, pod, node)
		}
		return err
	}); err != nil {
		return err
	}
	return probeConcealed(ctx, env, ns, pod)
}

// probeConcealed asks kube-env from inside pod and wants the concealed answer. An exec
// that fails (the container of a new sandbox not started yet) is retried for a
// minute; any answer but the concealed one fails at once.
func probeConcealed(ctx context.Context, env *Env, ns, pod string) error {
	var l probeLine
	if err := poll(ctx, time.Minute, func() error {
		var err error
		l, err = probeGet(ctx, env, ns, pod, kubeEnvURL)
		return err
	}); err != nil {
		return err
	}
	if l.Leak || !l.concealed() {
		return errf("pod %s/%s: kube-env got %s, want 403 %q", ns, pod, l, ConcealedBody)
	}
	return nil
}

// faultEnd is how every drill ends: each workload pod concealed, then the node
// agent's unprotected-pods gauge 0 after a repair scan that started after since.
func faultEnd(ctx context.Context, env *Env, since time.Time) (string, error) {
	pods, err := allWorkloadsConcealed(ctx, env, false)
	if err != nil {
		return "", err
	}
	zero, err := waitUnprotectedZero(ctx, env, since)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("all %d workload pods concealed; %s", len(pods), zero), nil
}

type workloadPod struct{ ns, name string }

// workloadPods lists the scenarios' probe pods that metaconceal conceals: every pod
// of the probe image in a metaconceal-e2e* namespace, except hostNetwork pods, pods
// of the excluded namespace and pods being deleted.
func workloadPods(ctx context.Context, env *Env) ([]workloadPod, error) {
	out, err := kubectl(ctx, env, nil, "get", "pods", "-A", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Namespace         string  `json:"namespace"`
				Name              string  `json:"name"`
				DeletionTimestamp *string `json:"deletionTimestamp"`
			} `json:"metadata"`
			Spec struct {
				HostNetwork bool `json:"hostNetwork"`
				Containers  []struct {
					Image string `json:"image"`
				} `json:"containers"`
			} `json:"spec"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("decode pods: %w", err)
	}
	var pods []workloadPod
	for _, it := range list.Items {
		m := it.Metadata
		if !strings.HasPrefix(m.Namespace, WorkloadNamespace) || m.Namespace == ExcludedNamespace ||
			m.DeletionTimestamp != nil || it.Spec.HostNetwork ||
			len(it.Spec.Containers) == 0 || it.Spec.Containers[0].Image != env.Cluster.Images().Probe {
			continue
		}
		pods = append(pods, workloadPod{m.Namespace, m.Name})
	}
	return pods, nil
}

// allWorkloadsConcealed waits until every workload pod is Ready and asks kube-env
// from inside each: every answer must be the concealed one. With recorded, each must
// also have a state record (after a reboot: written anew).
func allWorkloadsConcealed(ctx context.Context, env *Env, recorded bool) ([]workloadPod, error) {
	pods, err := workloadPods(ctx, env)
	if err != nil {
		return nil, err
	}
	for _, p := range pods {
		if _, err := kubectl(ctx, env, nil, "-n", p.ns, "wait", "--for=condition=Ready", "pod/"+p.name, "--timeout=180s"); err != nil {
			return nil, err
		}
		if recorded {
			if err := concealedAndRecorded(ctx, env, p.ns, p.name); err != nil {
				return nil, err
			}
			continue
		}
		if err := probeConcealed(ctx, env, p.ns, p.name); err != nil {
			return nil, err
		}
	}
	return pods, nil
}

// podsBeforeProxy says how long before the proxy container of node was ready the
// first of pods was running again (API times: whole seconds).
func podsBeforeProxy(ctx context.Context, env *Env, node string, pods []workloadPod) (string, error) {
	ds, _, err := proxyPod(ctx, env, node)
	if err != nil {
		return "", err
	}
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "get", "pod", ds, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}")
	if err != nil {
		return "", err
	}
	proxyReadyAt, err := time.Parse(time.RFC3339, strings.TrimSpace(string(out)))
	if err != nil {
		return "", fmt.Errorf("proxy pod %s Ready time %q: %w", ds, out, err)
	}
	var first time.Time
	for _, p := range pods {
		out, err := kubectl(ctx, env, nil, "-n", p.ns, "get", "pod", p.name, "-o", "jsonpath={.status.containerStatuses[0].state.running.startedAt}")
		if err != nil {
			return "", err
		}
		t, err := time.Parse(time.RFC3339, strings.TrimSpace(string(out)))
		if err != nil {
			return "", fmt.Errorf("pod %s/%s start %q: %w", p.ns, p.name, out, err)
		}
		if first.IsZero() || t.Before(first) {
			first = t
		}
	}
	if first.IsZero() {
		return "", errf("no workload pod")
	}
	return fmt.Sprintf("first workload pod running again %.0fs before the proxy pod was Ready", proxyReadyAt.Sub(first).Seconds()), nil
}

// What the node agent's readiness gate logs at its first step after a boot.
const (
	gateClosedAtBoot = "since it booted; tainting it until it does"
	gateOpen         = "readiness gate open"
)

// taintTimes is what watchTaint saw: when the readiness taint was first seen on the
// node and when first seen gone after that (0: not seen), from its start.
type taintTimes struct {
	on, off time.Duration
	looks   int
}

// watchTaint looks at node's taints every 200 ms from since until ctx is done or the
// taint, once seen, is gone.
func watchTaint(ctx context.Context, env *Env, node string, since time.Time) taintTimes {
	var tt taintTimes
	for ctx.Err() == nil {
		if t, err := nodeTainted(ctx, env, node); err == nil {
			tt.looks++
			switch {
			case t && tt.on == 0:
				tt.on = time.Since(since)
			case !t && tt.on > 0:
				tt.off = time.Since(since)
				return tt
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	return tt
}
