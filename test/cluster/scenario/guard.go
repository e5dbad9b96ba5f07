package scenario

// The host guard on a live node (issue 16): what other software does to the node's
// tables is undone by the proxy's reconciler, and the node agent's datapath self-test
// says whether the guard stands between a pod and the metadata server.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

const (
	proxyMetrics = "http://127.0.0.1:989/metrics" // the proxy's --metrics-listen, node netns
	guardChain   = "METACONCEAL-GUARD"            // prefix of every chain of the host guard
)

var guardPodManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("guard-check", "{{.WorkloadNamespace}}", probeSpec{})

// bareGuardPod starts a concealed pod and flushes its own rules from the node (as a
// pod holding CAP_NET_ADMIN can do to itself), so that only the host guard stands
// between it and the metadata server; it checks that the guard alone conceals
// kube-env, and returns the pod's node.
func bareGuardPod(ctx context.Context, env *Env) (node string, err error) {
	if err := apply(ctx, env, guardPodManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=guard-check", 2*time.Minute); err != nil {
		return "", err
	}
	node, err = podNode(ctx, env, WorkloadNamespace, "guard-check")
	if err != nil {
		return "", err
	}
	rec, err := podRecord(ctx, env, node, WorkloadNamespace, "guard-check")
	if err != nil {
		return "", err
	}
	// Both backends: the plugin used one of them.
	flush := "for t in iptables iptables-legacy; do command -v $t >/dev/null || continue; $t -t nat -F OUTPUT; $t -t filter -F OUTPUT; done; (iptables-save; iptables-legacy-save) 2>/dev/null | grep -c '^-A OUTPUT' || true"
	out, err := env.Cluster.NodeExec(ctx, node, "nsenter", "--net="+rec.Netns, "sh", "-c", flush)
	if err != nil {
		return "", fmt.Errorf("flush the pod's own rules in %s: %w (%s)", rec.Netns, err, out)
	}
	if n := strings.TrimSpace(string(out)); n != "0" {
		return "", errf("the pod's OUTPUT chains still hold %s rules after the flush", n)
	}
	if err := expectConcealed(ctx, env, "guard-check", "the guard alone"); err != nil {
		return "", err
	}
	return node, nil
}

// deleteBareGuardPod removes the pod whose own rules are gone (no later scenario
// may meet it), joining a failure to *err.
func deleteBareGuardPod(ctx context.Context, env *Env, err *error) {
	if _, derr := kubectl(ctx, env, nil, "-n", WorkloadNamespace, "delete", "pod", "guard-check", "--ignore-not-found", "--wait=true", "--timeout=60s"); derr != nil && *err == nil {
		*err = fmt.Errorf("delete pod guard-check: %w", derr)
	}
}

// expectConcealed asks kube-env from pod and wants the concealed answer.
func expectConcealed(ctx context.Context, env *Env, pod, when string) error {
	l, err := probeGet(ctx, env, WorkloadNamespace, pod, kubeEnvURL)
	if err != nil {
		return err
	}
	if l.Leak || !l.concealed() {
		return errf("pod %s, %s: kube-env got %s, want 403 %q", pod, when, l, ConcealedBody)
	}
	return nil
}

// guardReconcile: with the pod's own rules gone, the node's guard chains are flushed
// by hand (a firewall reload, an administrator's iptables -F); the proxy restores them
// within its reconcile interval (5 s), counts the repair, and the pod is concealed
// again.
func guardReconcile(ctx context.Context, env *Env) (_ string, err error) {
	defer deleteBareGuardPod(ctx, env, &err)
	node, err := bareGuardPod(ctx, env)
	if err != nil {
		return "", err
	}
	before, err := guardRules(ctx, env, node)
	if err != nil {
		return "", err
	}
	if before == 0 {
		return "", errf("no %s rule on node %s before the flush: nothing to test", guardChain, node)
	}
	repairsBefore, err := guardRepairs(ctx, env, node)
	if err != nil {
		return "", err
	}
	flush := `for s in iptables ip6tables iptables-legacy ip6tables-legacy; do
  command -v $s-save >/dev/null || continue
  $s-save 2>/dev/null | awk -v p='` + guardChain + `' '/^\*/{t=substr($0,2)} /^:/{c=substr($1,2); if (index(c,p)==1) print t, c}' |
  while read t c; do $s -t $t -F $c; done
done`
	if out, err := env.Cluster.NodeExec(ctx, node, "sh", "-c", flush); err != nil {
		return "", fmt.Errorf("flush the guard on %s: %w (%s)", node, err, out)
	}
	flushed := time.Now()
	if n, err := guardRules(ctx, env, node); err != nil {
		return "", err
	} else if n >= before {
		return "", errf("the flush left %d of %d guard rules: nothing was taken away", n, before)
	}
	if err := poll(ctx, 20*time.Second, func() error {
		n, err := guardRules(ctx, env, node)
		if err != nil {
			return err
		}
		if n < before {
			return errf("%d of %d guard rules back", n, before)
		}
		return nil
	}); err != nil {
		return "", err
	}
	restored := time.Since(flushed)
	if err := expectConcealed(ctx, env, "guard-check", "after the guard was flushed and restored"); err != nil {
		return "", err
	}
	repairs, err := guardRepairs(ctx, env, node)
	if err != nil {
		return "", err
	}
	if repairs <= repairsBefore {
		return "", errf("metaconceal_guard_repairs_total %v after the repair, %v before: the repair was not counted", repairs, repairsBefore)
	}
	if restored > 10*time.Second {
		return "", errf("guard restored %.1fs after the flush, want within the 5 s interval (and a margin)", restored.Seconds())
	}
	return fmt.Sprintf("%d guard rules flushed on %s, all back after %.1fs (polled every 0.5s), repairs %v -> %v; pod without its own rules concealed before and after",
		before, node, restored.Seconds(), repairsBefore, repairs), nil
}

// guardRules counts the rules in the guard's chains on node, every backend and family.
func guardRules(ctx context.Context, env *Env, node string) (int, error) {
	out, err := env.Cluster.NodeExec(ctx, node, "sh", "-c",
		"(iptables-save; ip6tables-save; iptables-legacy-save; ip6tables-legacy-save) 2>/dev/null | grep -c '^-A "+guardChain+"' || true")
	if err != nil {
		return 0, fmt.Errorf("count guard rules on %s: %w", node, err)
	}
	var n int
	_, err = fmt.Sscan(strings.TrimSpace(string(out)), &n)
	return n, err
}

// guardRepairs sums metaconceal_guard_repairs_total over its labels on node (0
// before the first repair: a counter vector has no series until then).
func guardRepairs(ctx context.Context, env *Env, node string) (float64, error) {
	m, err := metricValues(ctx, env, node, proxyMetrics)
	if err != nil {
		return 0, err
	}
	sum := 0.0
	for k, v := range m {
		if strings.HasPrefix(k, "metaconceal_guard_repairs_total{") {
			sum += v
		}
	}
	return sum, nil
}

// podNode is the node a pod runs on.
func podNode(ctx context.Context, env *Env, ns, pod string) (string, error) {
	out, err := kubectl(ctx, env, nil, "-n", ns, "get", "pod", pod, "-o", "jsonpath={.spec.nodeName}")
	if err != nil {
		return "", err
	}
	if len(out) == 0 {
		return "", errf("pod %s/%s has no node", ns, pod)
	}
	return string(out), nil
}

// stateRecord is what the scenarios read of a plugin state record.
type stateRecord struct {
	Netns  string   `json:"netns"`
	IPs    []string `json:"ips"`
	HostIf string   `json:"hostIf"`
}

// podRecord reads the plugin's state record of pod ns/name on node.
func podRecord(ctx context.Context, env *Env, node, ns, name string) (stateRecord, error) {
	path, ok, err := findRecord(ctx, env, node, ns, name)
	if err != nil {
		return stateRecord{}, err
	}
	if !ok {
		return stateRecord{}, errf("no state record for %s/%s on %s", ns, name, node)
	}
	data, err := env.Cluster.NodeReadFile(ctx, node, path)
	if err != nil {
		return stateRecord{}, err
	}
	var rec stateRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		return stateRecord{}, fmt.Errorf("%s: %w", path, err)
	}
	if rec.Netns == "" {
		return stateRecord{}, errf("%s names no netns", path)
	}
	return rec, nil
}

const (
	guardCondition     = "MetadataConcealmentGuard"         // the node agent's node condition
	guardBypassedEvent = "MetadataConcealmentGuardBypassed" // its Warning Event on the node
	// selftestPeriod is the overlay's --selftest-interval (test/cluster/deploy).
	selftestPeriod = 5 * time.Second
)

// inertGuard makes the host guard inert on a node the way datapaths that skip
// netfilter's usual path do in effect (docs/datapath.md): connection tracking is
// switched off for traffic to and from the metadata address, so the guard's nat
// rules never see it, and an ACCEPT ahead of the guard's filter rules lets it through
// (Calico's insert mode). The rules are not the guard's, so its reconciler leaves them.
var inertGuard = [][]string{
	{"-t", "raw", "PREROUTING", "-d", "169.254.169.254/32", "-j", "NOTRACK"},
	{"-t", "raw", "OUTPUT", "-s", "169.254.169.254/32", "-j", "NOTRACK"},
	{"-t", "filter", "INPUT", "-d", "169.254.169.254/32", "-j", "ACCEPT"},
	{"-t", "filter", "OUTPUT", "-s", "169.254.169.254/32", "-j", "ACCEPT"},
}

// guardSelftest: the node agent's datapath self-test, run from a concealed pod's
// netns, reports the guard effective: condition True / Effective, gauge 1.
func guardSelftest(ctx context.Context, env *Env) (string, error) {
	var details []string
	for _, node := range env.Cluster.Nodes() {
		var c nodeCondition
		start := time.Now()
		if err := poll(ctx, 12*selftestPeriod+30*time.Second, func() error {
			var err error
			if c, err = guardConditionOf(ctx, env, node); err != nil {
				return err
			}
			if c.Status != "True" || c.Reason != "Effective" {
				return errf("node %s: %s=%s (%s): %s", node, guardCondition, c.Status, c.Reason, c.Message)
			}
			return nil
		}); err != nil {
			return "", err
		}
		g, err := guardGauge(ctx, env, node)
		if err != nil {
			return "", err
		}
		if g != 1 {
			return "", errf("node %s: condition True but metaconceal_guard_effective %v", node, g)
		}
		details = append(details, fmt.Sprintf("%s: %s=True (Effective) after %.1fs, metaconceal_guard_effective 1 (%s)", node, guardCondition, time.Since(start).Seconds(), c.Message))
	}
	return strings.Join(details, "; "), nil
}

// guardBypassDetected: the guard is made inert on the node; within two self-test
// periods (and the time of one probe) the condition turns False with reason Bypassed,
// the gauge 0, and a Warning Event is on the node; once the rules are gone again the
// condition is True again.
func guardBypassDetected(ctx context.Context, env *Env) (_ string, err error) {
	var details []string
	for _, node := range env.Cluster.Nodes() {
		if c, err := guardConditionOf(ctx, env, node); err != nil {
			return "", err
		} else if c.Status != "True" {
			return "", errf("node %s: %s=%s before the guard is made inert, want True (guard-selftest runs first)", node, guardCondition, c.Status)
		}
		tool, err := guardTool(ctx, env, node)
		if err != nil {
			return "", err
		}
		undo := func() error {
			var errs []string
			for _, r := range inertGuard {
				if out, err := env.Cluster.NodeExec(ctx, node, append([]string{tool, r[0], r[1], "-D"}, r[2:]...)...); err != nil {
					errs = append(errs, fmt.Sprintf("%v (%s)", err, out))
				}
			}
			if len(errs) > 0 {
				return errf("node %s: remove the inert rules: %s", node, strings.Join(errs, "; "))
			}
			return nil
		}
		for _, r := range inertGuard {
			if out, err := env.Cluster.NodeExec(ctx, node, append([]string{tool, r[0], r[1], "-I"}, append([]string{r[2], "1"}, r[3:]...)...)...); err != nil {
				return "", errors.Join(fmt.Errorf("node %s: %s %v: %w (%s)", node, tool, r, err, out), undo())
			}
		}
		inert := time.Now()
		var c nodeCondition
		err = poll(ctx, 2*selftestPeriod+20*time.Second, func() error {
			var err error
			if c, err = guardConditionOf(ctx, env, node); err != nil {
				return err
			}
			if c.Status != "False" || c.Reason != "Bypassed" {
				return errf("node %s: %s=%s (%s) with the guard inert, want False/Bypassed", node, guardCondition, c.Status, c.Reason)
			}
			return nil
		})
		detected := time.Since(inert)
		if err != nil {
			return "", errors.Join(err, undo())
		}
		g, gerr := guardGauge(ctx, env, node)
		ev, everr := nodeEvent(ctx, env, node, guardBypassedEvent)
		if err := errors.Join(gerr, everr, undo()); err != nil {
			return "", err
		}
		if g != 0 {
			return "", errf("node %s: condition Bypassed but metaconceal_guard_effective %v", node, g)
		}
		if ev.Type != "Warning" {
			return "", errf("node %s: %s Event of type %q, want Warning", node, guardBypassedEvent, ev.Type)
		}
		restored := time.Now()
		if err := poll(ctx, 2*selftestPeriod+20*time.Second, func() error {
			c, err := guardConditionOf(ctx, env, node)
			if err != nil {
				return err
			}
			if c.Status != "True" {
				return errf("node %s: %s=%s (%s) after the inert rules went", node, guardCondition, c.Status, c.Reason)
			}
			return nil
		}); err != nil {
			return "", err
		}
		details = append(details, fmt.Sprintf("%s: False/Bypassed %.1fs after the guard was made inert (period %s), gauge 0, Warning Event %q; True again %.1fs after",
			node, detected.Seconds(), selftestPeriod, ev.Message, time.Since(restored).Seconds()))
	}
	return strings.Join(details, "; "), nil
}

type nodeCondition struct {
	Type    string `json:"type"`
	Status  string `json:"status"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// guardConditionOf reads the node's MetadataConcealmentGuard condition.
func guardConditionOf(ctx context.Context, env *Env, node string) (nodeCondition, error) {
	out, err := kubectl(ctx, env, nil, "get", "node", node, "-o", "jsonpath={.status.conditions}")
	if err != nil {
		return nodeCondition{}, err
	}
	var conds []nodeCondition
	if err := json.Unmarshal(out, &conds); err != nil {
		return nodeCondition{}, fmt.Errorf("node %s conditions %q: %w", node, out, err)
	}
	for _, c := range conds {
		if c.Type == guardCondition {
			return c, nil
		}
	}
	return nodeCondition{}, errf("node %s has no %s condition", node, guardCondition)
}

// guardGauge reads metaconceal_guard_effective from the node agent (any labels).
func guardGauge(ctx context.Context, env *Env, node string) (float64, error) {
	m, err := agentMetricValues(ctx, env, node)
	if err != nil {
		return 0, err
	}
	for k, v := range m {
		if k == "metaconceal_guard_effective" || strings.HasPrefix(k, "metaconceal_guard_effective{") {
			return v, nil
		}
	}
	return 0, errf("the node agent on %s exports no metaconceal_guard_effective", node)
}

// guardTool is the iptables of the backend that holds the guard on node.
func guardTool(ctx context.Context, env *Env, node string) (string, error) {
	for _, tool := range []string{"iptables", "iptables-legacy"} {
		out, err := env.Cluster.NodeExec(ctx, node, "sh", "-c", tool+"-save 2>/dev/null | grep -c '^:"+guardChain+"' || true")
		if err == nil && strings.TrimSpace(string(out)) != "0" {
			return tool, nil
		}
	}
	return "", errf("no backend on node %s holds a %s chain", node, guardChain)
}

// nodeEvent is the latest Event with reason on node.
func nodeEvent(ctx context.Context, env *Env, node, reason string) (eventInfo, error) {
	out, err := kubectl(ctx, env, nil, "get", "events", "-A", "--field-selector",
		"involvedObject.kind=Node,involvedObject.name="+node+",reason="+reason, "-o", "json")
	if err != nil {
		return eventInfo{}, err
	}
	var list struct {
		Items []eventInfo `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return eventInfo{}, err
	}
	if len(list.Items) == 0 {
		return eventInfo{}, errf("no %s Event on node %s", reason, node)
	}
	return list.Items[len(list.Items)-1], nil
}

var altsPodManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("alts-check", "{{.WorkloadNamespace}}", probeSpec{})

// altsLine is one line of `probe alts`.
type altsLine struct {
	Name     string `json:"name"`
	Answered bool   `json:"answered"`
	Body     string `json:"body"`
	Err      string `json:"err"`
}

// altsRelayScope: from a concealed pod, port 8080 of the metadata address (DNATed to
// the proxy's ALTS relay) carries the gRPC call to the ALTS handshaker service, and
// nothing else: HTTP/1.1, h2c for another path or service, a non-gRPC POST get no
// answer from the server behind it; the refusals are counted.
func altsRelayScope(ctx context.Context, env *Env) (string, error) {
	if err := apply(ctx, env, altsPodManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=alts-check", 2*time.Minute); err != nil {
		return "", err
	}
	node, err := podNode(ctx, env, WorkloadNamespace, "alts-check")
	if err != nil {
		return "", err
	}
	refusedBefore, err := altsRefused(ctx, env, node)
	if err != nil {
		return "", err
	}
	out, err := kubectl(ctx, env, nil, "-n", WorkloadNamespace, "exec", "alts-check", "--", "/probe", "alts", "169.254.169.254:8080")
	if err != nil {
		return "", err
	}
	var lines []altsLine
	for _, raw := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var l altsLine
		if err := json.Unmarshal([]byte(raw), &l); err != nil {
			return "", fmt.Errorf("probe alts line %q: %w", raw, err)
		}
		lines = append(lines, l)
	}
	if len(lines) < 2 {
		return "", errf("probe alts printed %d lines, want the handshaker call and the others:\n%s", len(lines), out)
	}
	if hs := lines[0]; !hs.Answered || !strings.HasPrefix(hs.Body, "MCFAKEALTS handshaker ready") {
		return "", errf("%s: answered=%v %q (%s), want the handshaker's answer through the relay", hs.Name, hs.Answered, hs.Body, hs.Err)
	}
	for _, l := range lines[1:] {
		if l.Answered || l.Body != "" {
			return "", errf("%s: answered %q through the relay, want no answer", l.Name, l.Body)
		}
	}
	refused, err := altsRefused(ctx, env, node)
	if err != nil {
		return "", err
	}
	if refused-refusedBefore < float64(len(lines)-1) {
		return "", errf("metaconceal_proxy_alts_refused_total rose by %v for %d refused requests", refused-refusedBefore, len(lines)-1)
	}
	return fmt.Sprintf("handshaker call over h2c relayed (%q); %d other requests (HTTP/1.1, h2c other service/path, not gRPC, dot segment) unanswered, refusals counted %v -> %v",
		lines[0].Body, len(lines)-1, refusedBefore, refused), nil
}

// altsRefused sums metaconceal_proxy_alts_refused_total over its reasons on node (0
// before the first refusal: a counter vector has no series until then).
func altsRefused(ctx context.Context, env *Env, node string) (float64, error) {
	m, err := metricValues(ctx, env, node, proxyMetrics)
	if err != nil {
		return 0, err
	}
	sum := 0.0
	for k, v := range m {
		if strings.HasPrefix(k, "metaconceal_proxy_alts_refused_total{") {
			sum += v
		}
	}
	return sum, nil
}
