package scenario

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// List is every scenario, in the order they run. The uninstall scenario stays last.
// Issue 12's readiness-gate, repair-preexisting, pod-events and unprotected-zero go
// before uninstall (repair-preexisting creates its pods in Prepare, before install).
func List() []Scenario {
	return []Scenario{
		// nodeagent.go (issue 12): the gate and the repair first, right after the install.
		{Name: "readiness-gate", Prepare: prepareReadinessGate, Run: readinessGate},
		{Name: "repair-preexisting", Prepare: prepareRepair, Run: repairPreexisting},
		// helm.go (issue 20): only in a pass that installs with the chart (--install=helm).
		{Name: HelmScenario, Run: helmInstall},
		{Name: "deployment-concealed", Run: deploymentConcealed},
		{Name: "pod-events", Run: podEvents},
		{Name: "hostnetwork-direct", Run: hostNetworkDirect},
		{Name: "excluded-namespace-exposed", Run: excludedNamespaceExposed},
		// guard.go (issue 16): the host guard on a live node.
		{Name: "guard-reconcile", Run: guardReconcile},
		{Name: "guard-selftest", Run: guardSelftest},
		{Name: "guard-bypass-detected", Run: guardBypassDetected},
		{Name: "alts-relay-scope", Run: altsRelayScope},
		{Name: "rolling-update", Run: rollingUpdate, Timeout: 5 * time.Minute},
		// faults.go (issue 18): fault drills, each ending with every workload pod
		// concealed and no unprotected pod; the reboot last, since it restarts every pod.
		{Name: "proxy-killed", Run: proxyKilled},
		{Name: "kubelet-restart", Run: kubeletRestart, Timeout: 5 * time.Minute},
		{Name: "containerd-restart", Run: containerdRestart, Timeout: 5 * time.Minute},
		{Name: "node-reboot", Run: nodeReboot, Timeout: 8 * time.Minute},
		{Name: "unprotected-zero", Run: unprotectedZero},
		{Name: "uninstall", Run: uninstall, Timeout: 5 * time.Minute},
	}
}

// Install applies the deploy dir as a user would and waits until the DaemonSet is
// rolled out and every node's primary conflist holds the entry. It records each
// node's conflist first, for the uninstall scenario's byte comparison.
func Install(ctx context.Context, env *Env) (string, error) {
	nodes := env.Cluster.Nodes()
	if len(nodes) == 0 {
		return "", errNoNodes
	}
	env.ConflistBefore = map[string]NodeFile{}
	for _, n := range nodes {
		f, err := primaryConflist(ctx, env, n)
		if err != nil {
			return "", err
		}
		if e, err := entryOf(f.Data); err != nil || e != nil {
			return "", errf("%s on %s before install: entry %v, err %v: want a conflist without metaconceal", f.Path, n, e, err)
		}
		env.ConflistBefore[n] = f
	}
	start := time.Now()
	if err := installObjects(ctx, env); err != nil {
		return "", err
	}
	if err := rolloutStatus(ctx, env, 3*time.Minute); err != nil {
		return "", err
	}
	ready := time.Since(start)
	var files []string
	for _, n := range nodes {
		f, err := primaryConflist(ctx, env, n)
		if err != nil {
			return "", err
		}
		e, err := entryOf(f.Data)
		if err != nil {
			return "", err
		}
		if e == nil {
			return "", errf("%s on %s has no metaconceal entry after the rollout", f.Path, n)
		}
		files = append(files, f.Path)
	}
	return fmt.Sprintf("daemonset ready %.1fs after apply; entry in %s", ready.Seconds(), strings.Join(files, ", ")), nil
}

var workloadManifest = namespaceDoc("{{.WorkloadNamespace}}") + probeDeployment("concealed", "{{.WorkloadNamespace}}", 2, probeSpec{})

// deploymentConcealed: a Deployment's pods (created through the API, scheduled,
// started by kubelet, attached by the runtime through the patched conflist) get the
// concealed answer for kube-env and identity, 200 for project-id and token; the proxy's
// audit line names the real pod.
func deploymentConcealed(ctx context.Context, env *Env) (string, error) {
	if err := apply(ctx, env, workloadManifest, nil); err != nil {
		return "", err
	}
	pods, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=concealed", 2*time.Minute)
	if err != nil {
		return "", err
	}
	checks := 0
	for i, pod := range pods {
		for _, c := range podChecks {
			// Every check from the first pod, the main four from the others.
			if i > 0 && !c.main {
				continue
			}
			l, err := probeGet(ctx, env, WorkloadNamespace, pod, c.url, c.headers...)
			if err != nil {
				return "", err
			}
			checks++
			switch {
			case l.Leak:
				return "", errf("pod %s: %s: got %s: kube-env or identity content leaked", pod, c.url, l)
			case c.status == 403 && c.conceal && !l.concealed():
				return "", errf("pod %s: %s: got %s, want 403 %q", pod, c.url, l, ConcealedBody)
			case l.Status != c.status || !strings.Contains(l.Body, c.want):
				return "", errf("pod %s: %s %v: got %s, want %d %q", pod, c.url, c.headers, l, c.status, c.want)
			}
		}
	}
	// The audit line for each pod's kube-env request names that pod.
	logs, err := proxyLogs(ctx, env)
	if err != nil {
		return "", err
	}
	for _, pod := range pods {
		if !hasAuditLine(logs, WorkloadNamespace, pod, "kube-env") {
			return "", errf("no audit line naming %s/%s for kube-env in the proxy log:\n%s", WorkloadNamespace, pod, lastLines(logs, 10))
		}
	}
	return fmt.Sprintf("%d pods, %d requests: kube-env (7 spellings) and identity concealed, legacy/unknown APIs, recursive and X-Forwarded-For denied, project-id and token 200; audit names %s/{%s}",
		len(pods), checks, WorkloadNamespace, strings.Join(pods, ",")), nil
}

// podChecks are the requests a concealed pod makes, after the pattern of Kubernetes'
// own metadata-concealment e2e check: concealed, denied and allowed answers.
var podChecks = []struct {
	url     string
	headers []string
	status  int
	conceal bool   // 403 with the concealed body
	want    string // must be in the body
	main    bool   // asked from every pod, not only the first
}{
	{url: kubeEnvURL, status: 403, conceal: true, main: true},
	{url: identityURL, status: 403, conceal: true, main: true},
	{url: projectURL, status: 200, main: true},
	{url: tokenURL, status: 200, want: "access_token", main: true},
	{url: metadataBase + "instance/attributes//kube-env", status: 403, conceal: true},
	{url: metadataBase + "instance/attributes/../attributes/kube-env", status: 403, conceal: true},
	{url: metadataBase + "instance/attributes/%6bube-env", status: 403, conceal: true},
	{url: metadataBase + "instance/attributes/kube-env/", status: 403, conceal: true},
	{url: metadataBase + "instance/attributes/KUBE-ENV", status: 403, conceal: true},
	{url: "http://169.254.169.254/computeMetadata/v1beta1/instance/attributes/kube-env", status: 403},
	{url: "http://169.254.169.254/0.1/meta-data/attributes/kube-env", status: 403},
	{url: "http://169.254.169.254/computeMetadata/v2/", status: 403},
	{url: metadataBase + "instance/attributes/?recursive=true", status: 403},
	{url: projectURL, headers: []string{"X-Forwarded-For: 10.0.0.1"}, status: 403},
	{url: metadataBase, status: 200},
}

// hasAuditLine looks for the proxy's JSON audit line of a concealed request by pod.
func hasAuditLine(logs, ns, pod, rule string) bool {
	for _, line := range strings.Split(logs, "\n") {
		var l struct {
			Msg       string `json:"msg"`
			Verdict   string `json:"verdict"`
			Rule      string `json:"rule"`
			Namespace string `json:"pod_namespace"`
			Name      string `json:"pod_name"`
		}
		if json.Unmarshal([]byte(line), &l) != nil {
			continue
		}
		if l.Verdict == "conceal" && l.Rule == rule && l.Namespace == ns && l.Name == pod {
			return true
		}
	}
	return false
}

var hostNetworkManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("hostnet", "{{.WorkloadNamespace}}", probeSpec{HostNetwork: true})

// hostNetworkDirect: a hostNetwork pod shares the node's netns; the runtime never
// calls CNI for it, and it reads kube-env from the metadata server directly.
func hostNetworkDirect(ctx context.Context, env *Env) (string, error) {
	if err := apply(ctx, env, hostNetworkManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=hostnet", 2*time.Minute); err != nil {
		return "", err
	}
	for _, url := range []string{kubeEnvURL, identityURL} {
		l, err := probeGet(ctx, env, WorkloadNamespace, "hostnet", url)
		if err != nil {
			return "", err
		}
		if l.Status != 200 || !l.Leak {
			return "", errf("hostNetwork pod: %s: got %s, want 200 with the real content", url, l)
		}
	}
	return "hostNetwork pod read kube-env and identity from the metadata server (200, real content)", nil
}

var excludedManifest = namespaceDoc("{{.ExcludedNamespace}}") + probePod("exposed", "{{.ExcludedNamespace}}", probeSpec{})

// excludedNamespaceExposed: the operator excludes a namespace (the installer's
// --exclude-namespaces, in both installer containers, as the docs say), the DaemonSet
// rolls, the entry carries the namespace, and a pod there reads kube-env (with the host
// guard on: the proxy serves it as an exposed pod).
func excludedNamespaceExposed(ctx context.Context, env *Env) (string, error) {
	if err := setInstallerFlag(ctx, env, "--exclude-namespaces="+ExcludedNamespace); err != nil {
		return "", err
	}
	if err := rolloutStatus(ctx, env, 3*time.Minute); err != nil {
		return "", err
	}
	for _, n := range env.Cluster.Nodes() {
		if err := waitEntry(ctx, env, n, func(e map[string]any) bool {
			list, _ := e["excludeNamespaces"].([]any)
			return slices.Contains(list, any(ExcludedNamespace))
		}, time.Minute); err != nil {
			return "", err
		}
	}
	if err := apply(ctx, env, excludedManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, ExcludedNamespace, "app=exposed", 2*time.Minute); err != nil {
		return "", err
	}
	l, err := probeGet(ctx, env, ExcludedNamespace, "exposed", kubeEnvURL)
	if err != nil {
		return "", err
	}
	if l.Status != 200 || !l.Leak {
		return "", errf("pod in excluded namespace: kube-env: got %s, want 200 with the real content", l)
	}
	// A pod outside the exclusion is still concealed after the change (the
	// deployment-concealed scenario's; applied here too, so this one also runs alone).
	if err := apply(ctx, env, workloadManifest, nil); err != nil {
		return "", err
	}
	pods, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=concealed", 2*time.Minute)
	if err != nil {
		return "", err
	}
	c, err := probeGet(ctx, env, WorkloadNamespace, pods[0], kubeEnvURL)
	if err != nil {
		return "", err
	}
	if !c.concealed() {
		return "", errf("pod %s outside the exclusion after the change: got %s, want concealed", pods[0], c)
	}
	return fmt.Sprintf("pod in %s read kube-env (200); %s/%s still concealed", ExcludedNamespace, WorkloadNamespace, pods[0]), nil
}

// setInstallerFlag appends flag to the command of both installer containers (init
// install and keep-entry) of the DaemonSet and replaces it.
func setInstallerFlag(ctx context.Context, env *Env, flag string) error {
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "get", "daemonset", daemonSet, "-o", "json")
	if err != nil {
		return err
	}
	var ds map[string]any
	if err := json.Unmarshal(out, &ds); err != nil {
		return fmt.Errorf("decode daemonset: %w", err)
	}
	spec, _ := dig(ds, "spec", "template", "spec").(map[string]any)
	changed := 0
	for _, key := range []string{"initContainers", "containers"} {
		list, _ := spec[key].([]any)
		for _, c := range list {
			cm, _ := c.(map[string]any)
			cmd, _ := cm["command"].([]any)
			if len(cmd) == 0 || cmd[0] != "/metaconceal/metaconceal-install" {
				continue
			}
			if !slices.Contains(cmd, any(flag)) {
				cm["command"] = append(cmd, flag)
			}
			changed++
		}
	}
	if changed != 2 {
		return errf("found %d installer containers in the DaemonSet, want 2 (install, keep-entry)", changed)
	}
	data, err := json.Marshal(ds)
	if err != nil {
		return err
	}
	_, err = kubectl(ctx, env, data, "replace", "-f", "-")
	return err
}

func dig(m map[string]any, keys ...string) any {
	var cur any = m
	for _, k := range keys {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = mm[k]
	}
	return cur
}

// waitEntry waits until a node's primary conflist has an entry satisfying ok.
func waitEntry(ctx context.Context, env *Env, node string, ok func(map[string]any) bool, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last []byte
	for time.Now().Before(deadline) {
		f, err := primaryConflist(ctx, env, node)
		if err == nil {
			last = f.Data
			if e, err := entryOf(f.Data); err == nil && e != nil && ok(e) {
				return nil
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return errf("node %s: conflist entry not as wanted after %s:\n%s", node, timeout, last)
}

var proberManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("prober", "{{.WorkloadNamespace}}", probeSpec{Command: `["/probe", "loop", "-interval", "100ms", "{{.URL}}"]`})

// rollingUpdate is in rolling.go.

type probeStats struct {
	requests, concealed, leaks, noAnswer, other int
	longestGap                                  time.Duration
	lastConcealed                               bool
	last                                        probeLine
}

func (s probeStats) String() string {
	return fmt.Sprintf("leaks=%d requests=%d concealed=%d no-answer=%d other=%d longest-gap=%.2fs",
		s.leaks, s.requests, s.concealed, s.noAnswer, s.other, s.longestGap.Seconds())
}

// decodedLine is one non-empty line of a probe's log, decoded, with its text.
type decodedLine[T any] struct {
	v   T
	raw []byte
}

// decodeLines decodes every non-empty line of log as a T; what names the log in errors.
func decodeLines[T any](log []byte, what string) ([]decodedLine[T], error) {
	var out []decodedLine[T]
	for _, raw := range bytes.Split(log, []byte("\n")) {
		raw = bytes.TrimSpace(raw)
		if len(raw) == 0 {
			continue
		}
		var v T
		if err := json.Unmarshal(raw, &v); err != nil {
			return nil, fmt.Errorf("%s line %q: %w", what, raw, err)
		}
		out = append(out, decodedLine[T]{v, raw})
	}
	return out, nil
}

// analyzeProbeLog reads the prober's lines from sinceMillis on: leaks, answers and
// the longest time between two concealed answers (or from the window's start).
func analyzeProbeLog(log []byte, sinceMillis int64) (probeStats, error) {
	var st probeStats
	prev := sinceMillis
	lines, err := decodeLines[probeLine](log, "prober")
	if err != nil {
		return st, err
	}
	for _, dl := range lines {
		l := dl.v
		if l.T < sinceMillis {
			continue
		}
		st.requests++
		st.last = l
		st.lastConcealed = false
		switch {
		case l.Leak || (l.Status == 200):
			st.leaks++
		case l.concealed():
			st.concealed++
			st.lastConcealed = true
			if gap := time.Duration(l.T-prev) * time.Millisecond; gap > st.longestGap {
				st.longestGap = gap
			}
			prev = l.T
		case l.Err != "" || l.Status == 0:
			st.noAnswer++
		default:
			st.other++
		}
	}
	return st, nil
}

// uninstall: delete the workloads, every namespace whose name starts with
// metaconceal-e2e (their DEL removes their records), then the
// documented uninstall (kubectl delete -k, or helm uninstall; then the cleanup
// DaemonSet: helm.go, uninstallObjects), then check that
// the node's conflist is byte for byte what it was, that no metaconceal rule or
// address is left in the node's netns, that the plugin binary is gone and that no
// state record remains.
func uninstall(ctx context.Context, env *Env) (string, error) {
	// Every scenario's workloads live in namespaces named metaconceal-e2e*.
	out, err := kubectl(ctx, env, nil, "get", "namespaces", "-o", "jsonpath={.items[*].metadata.name}")
	if err != nil {
		return "", err
	}
	deleteArgs := []string{"delete", "namespace", "--ignore-not-found", "--timeout=120s"}
	for _, ns := range strings.Fields(string(out)) {
		if strings.HasPrefix(ns, WorkloadNamespace) {
			deleteArgs = append(deleteArgs, ns)
		}
	}
	step := time.Now()
	if len(deleteArgs) > 4 {
		if _, err := kubectl(ctx, env, nil, deleteArgs...); err != nil {
			return "", err
		}
	}
	env.Logf("workload namespaces %v deleted in %.1fs", deleteArgs[4:], time.Since(step).Seconds())
	if err := uninstallObjects(ctx, env); err != nil {
		return "", err
	}
	var problems []string
	paths := env.Cluster.Paths()
	for _, n := range env.Cluster.Nodes() {
		before := env.ConflistBefore[n]
		now, err := env.Cluster.NodeReadFile(ctx, n, before.Path)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %s: %v", n, before.Path, err))
		case !bytes.Equal(now, before.Data):
			problems = append(problems, fmt.Sprintf("%s: %s differs from before install:\n%s\nwas:\n%s", n, before.Path, now, before.Data))
		}
		rules, err := env.Cluster.NodeExec(ctx, n, "sh", "-c",
			`for s in iptables-nft-save ip6tables-nft-save iptables-legacy-save ip6tables-legacy-save; do command -v $s >/dev/null && $s; done; ip addr show dev lo`)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: read rules: %v", n, err))
		}
		for _, line := range strings.Split(string(rules), "\n") {
			if strings.Contains(strings.ToLower(line), "metaconceal") || strings.Contains(line, "169.254.169.252") {
				problems = append(problems, fmt.Sprintf("%s: left in the node netns: %s", n, strings.TrimSpace(line)))
			}
		}
		if out, err := env.Cluster.NodeExec(ctx, n, "sh", "-c", "ls -A "+paths.CNIBinDir+" | grep -x metaconceal || true"); err != nil || len(bytes.TrimSpace(out)) > 0 {
			problems = append(problems, fmt.Sprintf("%s: plugin binary still in %s (%v)", n, paths.CNIBinDir, err))
		}
		out, err := env.Cluster.NodeExec(ctx, n, "sh", "-c", "[ ! -d "+paths.StateDir+" ] || ls -A "+paths.StateDir)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: list %s: %v", n, paths.StateDir, err))
		} else if recs := strings.Fields(string(out)); len(recs) > 0 {
			problems = append(problems, fmt.Sprintf("%s: state records left in %s: %s", n, paths.StateDir, strings.Join(recs, " ")))
		}
	}
	if len(problems) > 0 {
		return "", errf("%s", strings.Join(problems, "; "))
	}
	return "conflist byte for byte as before, no metaconceal rule or address in the node netns, binary and state records gone", nil
}
