package scenario

// Issue 12's scenarios: the readiness gate, the repair of pods that predate the
// DaemonSet, Events on pods, and the unprotected-pods gauge at the end.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/pkg/nodegate"
	"github.com/metaconceal/metaconceal/pkg/podevents"
)

// RegisterWithTaints are the taints a node registers with (kubelet
// --register-with-taints, GKE --node-taints): metaconceal's readiness gate.
var RegisterWithTaints = []string{nodegate.TaintKey + "=:" + string(nodegate.Taint.Effect)}

const (
	preexistingNamespace = "metaconceal-e2e-pre"
	agentMetrics         = "http://127.0.0.1:990/metrics" // keep-entry's --metrics-listen, node netns
	repairPeriod         = 30 * time.Second               // keep-entry's --repair-interval
)

var gatedManifest = namespaceDoc("{{.WorkloadNamespace}}") + probeDeployment("gated", "{{.WorkloadNamespace}}", 1, probeSpec{})

// preexistingManifest: pods that run before metaconceal, as a DaemonSet that
// tolerates every taint (or a node without the gate) would.
var preexistingManifest = namespaceDoc("{{.Namespace}}") + probeDeployment("preexisting", "{{.Namespace}}", 2, probeSpec{TolerateAll: true})

// prepareReadinessGate: before the install, every node carries the taint from
// registration and a Deployment's pod (no toleration) is not scheduled.
func prepareReadinessGate(ctx context.Context, env *Env) error {
	for _, n := range env.Cluster.Nodes() {
		keys, err := nodeTaintKeys(ctx, env, n)
		if err != nil {
			return err
		}
		// Ours, and only ours: the scheduler's message says "untolerated taint(s)"
		// without naming them, so no other taint may explain the pod waiting.
		if len(keys) != 1 || keys[0] != nodegate.TaintKey {
			return errf("node %s taints %v before install: want exactly %s (kubelet --register-with-taints=%s)", n, keys, nodegate.TaintKey, RegisterWithTaints[0])
		}
	}
	if err := apply(ctx, env, gatedManifest, nil); err != nil {
		return err
	}
	time.Sleep(3 * time.Second) // the scheduler has had its chance
	pods, err := podJSON(ctx, env, WorkloadNamespace, "app=gated")
	if err != nil {
		return err
	}
	if len(pods) != 1 {
		return errf("%d gated pods, want 1", len(pods))
	}
	p := pods[0]
	if p.Spec.NodeName != "" || p.scheduled().Status != "False" || p.scheduled().Reason != "Unschedulable" || !strings.Contains(p.scheduled().Message, "taint") {
		return errf("pod %s before install: node %q, PodScheduled %+v; want unscheduled because of %s", p.Metadata.Name, p.Spec.NodeName, p.scheduled(), nodegate.TaintKey)
	}
	env.Logf("pod %s is not scheduled while the node carries %s: %s", p.Metadata.Name, nodegate.TaintKey, p.scheduled().Message)
	return nil
}

// readinessGate: once the DaemonSet runs, the taint is gone and the pod held back is
// scheduled, after the node agent started, gets a state record from its ADD and is
// concealed.
func readinessGate(ctx context.Context, env *Env) (string, error) {
	for _, n := range env.Cluster.Nodes() {
		if err := poll(ctx, time.Minute, func() error {
			tainted, err := nodeTainted(ctx, env, n)
			if err == nil && tainted {
				err = errf("node %s still carries %s", n, nodegate.TaintKey)
			}
			return err
		}); err != nil {
			return "", err
		}
	}
	names, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=gated", 2*time.Minute)
	if err != nil {
		return "", err
	}
	pods, err := podJSON(ctx, env, WorkloadNamespace, "app=gated")
	if err != nil || len(pods) != 1 {
		return "", errf("gated pods %v: %v", names, err)
	}
	p := pods[0]
	agentStart, err := agentStarted(ctx, env, p.Spec.NodeName)
	if err != nil {
		return "", err
	}
	scheduledAt := p.scheduled().LastTransitionTime
	if scheduledAt.Before(agentStart) {
		return "", errf("pod %s scheduled at %s, before the node agent started (%s)", p.Metadata.Name, scheduledAt, agentStart)
	}
	if _, ok, err := findRecord(ctx, env, p.Spec.NodeName, WorkloadNamespace, p.Metadata.Name); err != nil || !ok {
		return "", errf("pod %s has no state record (its ADD ran without metaconceal?): %v", p.Metadata.Name, err)
	}
	l, err := probeGet(ctx, env, WorkloadNamespace, p.Metadata.Name, kubeEnvURL)
	if err != nil {
		return "", err
	}
	if !l.concealed() {
		return "", errf("pod %s: kube-env: got %s, want concealed", p.Metadata.Name, l)
	}
	return fmt.Sprintf("taint gone; pod %s held back until the gate opened, scheduled %.1fs after the agent started, recorded and concealed",
		p.Metadata.Name, scheduledAt.Sub(agentStart).Seconds()), nil
}

// prepareRepair starts pods before metaconceal exists on the node.
func prepareRepair(ctx context.Context, env *Env) error {
	if err := apply(ctx, env, preexistingManifest, map[string]string{"Namespace": preexistingNamespace}); err != nil {
		return err
	}
	names, err := waitPodsReady(ctx, env, preexistingNamespace, "app=preexisting", 2*time.Minute)
	if err != nil {
		return err
	}
	env.Logf("pods running before metaconceal: %s", strings.Join(names, ", "))
	return nil
}

// repairPreexisting: within one repair period of the agent's start, each pod that
// predates the DaemonSet has a record (written by the plugin's ADD run by the agent),
// a MetadataRepaired Event, and its kube-env requests are concealed from inside it.
func repairPreexisting(ctx context.Context, env *Env) (string, error) {
	pods, err := podJSON(ctx, env, preexistingNamespace, "app=preexisting")
	if err != nil {
		return "", err
	}
	if len(pods) == 0 {
		return "", errf("no preexisting pods")
	}
	var slowest time.Duration
	for _, p := range pods {
		if p.Spec.NodeName == "" {
			return "", errf("pod %s not scheduled", p.Metadata.Name)
		}
		agentStart, err := agentStarted(ctx, env, p.Spec.NodeName)
		if err != nil {
			return "", err
		}
		var path string
		if err := poll(ctx, repairPeriod+30*time.Second, func() error {
			var ok bool
			path, ok, err = findRecord(ctx, env, p.Spec.NodeName, preexistingNamespace, p.Metadata.Name)
			if err == nil && !ok {
				err = errf("no state record for %s/%s yet", preexistingNamespace, p.Metadata.Name)
			}
			return err
		}); err != nil {
			return "", err
		}
		out, err := env.Cluster.NodeExec(ctx, p.Spec.NodeName, "stat", "-c", "%Y", path)
		if err != nil {
			return "", err
		}
		secs, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
		if err != nil {
			return "", err
		}
		// Whole seconds on both sides: allow one of rounding.
		took := time.Unix(secs, 0).Sub(agentStart.Truncate(time.Second))
		if took > repairPeriod+time.Second {
			return "", errf("pod %s repaired %s after the agent started, more than one repair period (%s)", p.Metadata.Name, took, repairPeriod)
		}
		slowest = max(slowest, took)
		l, err := probeGet(ctx, env, preexistingNamespace, p.Metadata.Name, kubeEnvURL)
		if err != nil {
			return "", err
		}
		if !l.concealed() {
			return "", errf("repaired pod %s: kube-env: got %s, want concealed", p.Metadata.Name, l)
		}
		if _, err := waitEvent(ctx, env, preexistingNamespace, p.Metadata.Name, podevents.ReasonRepaired, "", 30*time.Second); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("%d pods started before install: recorded within %s of the agent's start (period %s), kube-env concealed, %s Events",
		len(pods), slowest, repairPeriod, podevents.ReasonRepaired), nil
}

var eventsManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("events-probe", "{{.WorkloadNamespace}}", probeSpec{})

// podEvents: a concealed and a denied request from a pod show up in `kubectl get
// events` on that pod, with the path and the rule.
func podEvents(ctx context.Context, env *Env) (string, error) {
	if err := apply(ctx, env, eventsManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=events-probe", 2*time.Minute); err != nil {
		return "", err
	}
	const pod = "events-probe"
	const legacyURL = "http://169.254.169.254/0.1/meta-data/attributes/kube-env"
	for _, u := range []string{kubeEnvURL, legacyURL} {
		l, err := probeGet(ctx, env, WorkloadNamespace, pod, u)
		if err != nil {
			return "", err
		}
		if l.Status != 403 || l.Leak {
			return "", errf("%s: got %s, want 403", u, l)
		}
	}
	concealed, err := waitEvent(ctx, env, WorkloadNamespace, pod, podevents.ReasonConcealed, "/computeMetadata/v1/instance/attributes/kube-env", 30*time.Second)
	if err != nil {
		return "", err
	}
	if !strings.Contains(concealed.Message, "rule kube-env") || concealed.Type != "Warning" || concealed.Source.Component != "metaconceal-proxy" {
		return "", errf("Event %+v: want a Warning from metaconceal-proxy naming rule kube-env", concealed)
	}
	denied, err := waitEvent(ctx, env, WorkloadNamespace, pod, podevents.ReasonDenied, "/0.1/", 30*time.Second)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("kubectl get events on %s/%s: %s %q; %s %q", WorkloadNamespace, pod,
		concealed.Reason, concealed.Message, denied.Reason, denied.Message), nil
}

// unprotectedZero: at the end, after a repair scan that saw every pod, each node's
// agent reports no unprotected pod and an open gate.
func unprotectedZero(ctx context.Context, env *Env) (string, error) {
	return waitUnprotectedZero(ctx, env, time.Now())
}

// waitUnprotectedZero waits on each node for a repair scan that started after since,
// then wants metaconceal_unprotected_pods 0 and an open gate from the node agent.
func waitUnprotectedZero(ctx context.Context, env *Env, since time.Time) (string, error) {
	var details []string
	for _, n := range env.Cluster.Nodes() {
		var m map[string]float64
		if err := poll(ctx, repairPeriod+30*time.Second, func() error {
			var err error
			if m, err = agentMetricValues(ctx, env, n); err != nil {
				return err
			}
			if last := m["metaconceal_repair_last_scan_timestamp_seconds"]; last < float64(since.Unix()) {
				return errf("node %s: no repair scan since %s yet (metaconceal_repair_scan_errors_total %v)",
					n, since.Format(time.RFC3339), m["metaconceal_repair_scan_errors_total"])
			}
			return nil
		}); err != nil {
			return "", fmt.Errorf("%w; the agent's last scan error: %s", err, lastAgentLine(ctx, env, "repair scan incomplete"))
		}
		if v, ok := m["metaconceal_unprotected_pods"]; !ok || v != 0 {
			return "", errf("node %s: metaconceal_unprotected_pods %v (present %v), want 0", n, v, ok)
		}
		if m["metaconceal_readiness_gate_open"] != 1 {
			return "", errf("node %s: metaconceal_readiness_gate_open %v, want 1", n, m["metaconceal_readiness_gate_open"])
		}
		details = append(details, fmt.Sprintf("%s: unprotected 0, gate open, repaired %v, failed %v", n,
			m[`metaconceal_repair_pods_total{result="repaired"}`], m[`metaconceal_repair_pods_total{result="failed"}`]))
	}
	return strings.Join(details, "; "), nil
}

// --- helpers ---

// lastAgentLine is the node agents' last log line holding substr ("none" when none).
func lastAgentLine(ctx context.Context, env *Env, substr string) string {
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "logs", "-l", "app.kubernetes.io/name=metaconceal", "-c", "keep-entry", "--tail=300")
	if err != nil {
		return err.Error()
	}
	last := "none"
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, substr) {
			last = strings.TrimSpace(l)
		}
	}
	return last
}

type podInfo struct {
	Metadata struct {
		Name              string    `json:"name"`
		CreationTimestamp time.Time `json:"creationTimestamp"`
	} `json:"metadata"`
	Spec struct {
		NodeName string `json:"nodeName"`
	} `json:"spec"`
	Status struct {
		Conditions []condition `json:"conditions"`
	} `json:"status"`
}

type condition struct {
	Type               string    `json:"type"`
	Status             string    `json:"status"`
	Reason             string    `json:"reason"`
	Message            string    `json:"message"`
	LastTransitionTime time.Time `json:"lastTransitionTime"`
}

func (p podInfo) scheduled() condition {
	for _, c := range p.Status.Conditions {
		if c.Type == "PodScheduled" {
			return c
		}
	}
	return condition{}
}

func podJSON(ctx context.Context, env *Env, ns, selector string) ([]podInfo, error) {
	out, err := kubectl(ctx, env, nil, "-n", ns, "get", "pods", "-l", selector, "-o", "json")
	if err != nil {
		return nil, err
	}
	var list struct {
		Items []podInfo `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("decode pods: %w", err)
	}
	return list.Items, nil
}

func nodeTaintKeys(ctx context.Context, env *Env, node string) ([]string, error) {
	out, err := kubectl(ctx, env, nil, "get", "node", node, "-o", "jsonpath={.spec.taints[*].key}")
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

func nodeTainted(ctx context.Context, env *Env, node string) (bool, error) {
	keys, err := nodeTaintKeys(ctx, env, node)
	return slices.Contains(keys, nodegate.TaintKey), err
}

// agentStarted is when the keep-entry container (the node agent) of the DaemonSet pod
// on node last started.
func agentStarted(ctx context.Context, env *Env, node string) (time.Time, error) {
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "get", "pods", "-l", "app.kubernetes.io/name=metaconceal",
		"--field-selector", "spec.nodeName="+node, "-o", "json")
	if err != nil {
		return time.Time{}, err
	}
	var list struct {
		Items []struct {
			Status struct {
				ContainerStatuses []struct {
					Name  string `json:"name"`
					State struct {
						Running *struct {
							StartedAt time.Time `json:"startedAt"`
						} `json:"running"`
					} `json:"state"`
				} `json:"containerStatuses"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return time.Time{}, err
	}
	var latest time.Time
	for _, it := range list.Items {
		for _, cs := range it.Status.ContainerStatuses {
			if cs.Name == "keep-entry" && cs.State.Running != nil && cs.State.Running.StartedAt.After(latest) {
				latest = cs.State.Running.StartedAt
			}
		}
	}
	if latest.IsZero() {
		return latest, errf("no running keep-entry container on node %s", node)
	}
	return latest, nil
}

// findRecord looks in the node's state dir for the record of pod ns/name.
func findRecord(ctx context.Context, env *Env, node, ns, name string) (path string, ok bool, err error) {
	dir := env.Cluster.Paths().StateDir
	out, err := env.Cluster.NodeExec(ctx, node, "ls", "-1A", dir)
	if err != nil {
		return "", false, fmt.Errorf("list %s on %s: %w", dir, node, err)
	}
	for _, f := range strings.Fields(string(out)) {
		if !strings.HasSuffix(f, ".json") || strings.HasPrefix(f, ".") {
			continue
		}
		p := filepath.Join(dir, f)
		data, err := env.Cluster.NodeReadFile(ctx, node, p)
		if err != nil {
			continue // removed meanwhile by a DEL
		}
		var rec struct {
			PodNamespace string `json:"podNamespace"`
			PodName      string `json:"podName"`
		}
		if json.Unmarshal(data, &rec) == nil && rec.PodNamespace == ns && rec.PodName == name {
			return p, true, nil
		}
	}
	return "", false, nil
}

type eventInfo struct {
	Type    string `json:"type"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
	Count   int    `json:"count"`
	Source  struct {
		Component string `json:"component"`
		Host      string `json:"host"`
	} `json:"source"`
}

// waitEvent waits for an Event with reason on pod ns/name whose message holds substr.
func waitEvent(ctx context.Context, env *Env, ns, pod, reason, substr string, timeout time.Duration) (eventInfo, error) {
	var found eventInfo
	err := poll(ctx, timeout, func() error {
		out, err := kubectl(ctx, env, nil, "-n", ns, "get", "events", "--field-selector",
			"involvedObject.kind=Pod,involvedObject.name="+pod+",reason="+reason, "-o", "json")
		if err != nil {
			return err
		}
		var list struct {
			Items []eventInfo `json:"items"`
		}
		if err := json.Unmarshal(out, &list); err != nil {
			return err
		}
		for _, e := range list.Items {
			if strings.Contains(e.Message, substr) {
				found = e
				return nil
			}
		}
		return errf("no %s Event on %s/%s with %q (have %d with that reason)", reason, ns, pod, substr, len(list.Items))
	})
	return found, err
}

// agentMetricValues reads the node agent's metrics.
func agentMetricValues(ctx context.Context, env *Env, node string) (map[string]float64, error) {
	return metricValues(ctx, env, node, agentMetrics)
}

// metricValues reads a metrics endpoint on node (in the node's netns, its loopback)
// and returns the metaconceal series by name{labels}.
func metricValues(ctx context.Context, env *Env, node, url string) (map[string]float64, error) {
	out, err := env.Cluster.NodeExec(ctx, node, "curl", "-sS", "--max-time", "5", url)
	if err != nil {
		return nil, fmt.Errorf("node %s: %s: %w", node, url, err)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "metaconceal_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// poll retries check every 500 ms until it passes or timeout; the last error is returned.
func poll(ctx context.Context, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}
