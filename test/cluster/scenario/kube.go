package scenario

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"text/template"
	"time"
)

// Metadata URLs the checks ask, as a GCE client would.
const (
	metadataBase = "http://169.254.169.254/computeMetadata/v1/"
	kubeEnvURL   = metadataBase + "instance/attributes/kube-env"
	identityURL  = metadataBase + "instance/service-accounts/default/identity?audience=cluster-e2e"
	projectURL   = metadataBase + "project/project-id"
	tokenURL     = metadataBase + "instance/service-accounts/default/token"
	// ConcealedBody is the proxy's answer for a concealed endpoint.
	ConcealedBody = "This metadata endpoint is concealed."
)

// Namespaces the workloads run in: every scenario's namespaces start with
// WorkloadNamespace (the uninstall scenario deletes them all before it uninstalls).
// The excluded one is added to the installer's --exclude-namespaces by its scenario.
const (
	WorkloadNamespace = "metaconceal-e2e"
	ExcludedNamespace = "metaconceal-e2e-excluded"
	deployNamespace   = "metaconceal-system"
	daemonSet         = "metaconceal"
)

// probeLine is what the probe binary prints per request (test/cluster/probe).
type probeLine struct {
	T      int64  `json:"t"`
	Status int    `json:"status"`
	Body   string `json:"body"`
	Leak   bool   `json:"leak"`
	Err    string `json:"err"`
}

func (l probeLine) String() string {
	if l.Err != "" {
		return fmt.Sprintf("no answer (%s)", l.Err)
	}
	return fmt.Sprintf("%d %q", l.Status, strings.TrimSpace(l.Body))
}

func (l probeLine) concealed() bool {
	return l.Status == 403 && strings.Contains(l.Body, ConcealedBody) && !l.Leak
}

// kubectl runs kubectl and wraps its error with the command.
func kubectl(ctx context.Context, env *Env, stdin []byte, args ...string) ([]byte, error) {
	out, err := env.Cluster.Kubectl(ctx, stdin, args...)
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return out, nil
}

// apply renders a manifest template with the run's images and applies it.
func apply(ctx context.Context, env *Env, manifest string, data map[string]string) error {
	tmpl, err := template.New("manifest").Option("missingkey=error").Parse(manifest)
	if err != nil {
		return fmt.Errorf("parse manifest: %w", err)
	}
	vals := map[string]string{
		"ProbeImage":        env.Cluster.Images().Probe,
		"WorkloadNamespace": WorkloadNamespace,
		"ExcludedNamespace": ExcludedNamespace,
	}
	for k, v := range data {
		vals[k] = v
	}
	var buf bytes.Buffer
	if err := tmpl.Execute(&buf, vals); err != nil {
		return fmt.Errorf("render manifest: %w", err)
	}
	_, err = kubectl(ctx, env, buf.Bytes(), "apply", "-f", "-")
	return err
}

// waitPodsReady waits until pods matching selector in ns exist and are Ready.
func waitPodsReady(ctx context.Context, env *Env, ns, selector string, timeout time.Duration) ([]string, error) {
	// `kubectl wait` fails at once when no pod matches yet: wait for one first.
	deadline := time.Now().Add(timeout)
	for {
		names, err := podNames(ctx, env, ns, selector)
		if err != nil {
			return nil, err
		}
		if len(names) > 0 {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no pod with %s in %s after %s", selector, ns, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
	left := time.Until(deadline).Round(time.Second)
	if left < time.Second {
		left = time.Second
	}
	if _, err := kubectl(ctx, env, nil, "-n", ns, "wait", "--for=condition=Ready", "pod", "-l", selector, "--timeout="+left.String()); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, describePods(ctx, env, ns, selector))
	}
	return podNames(ctx, env, ns, selector)
}

func describePods(ctx context.Context, env *Env, ns, selector string) string {
	out, _ := env.Cluster.Kubectl(ctx, nil, "-n", ns, "get", "pods", "-l", selector, "-o", "wide")
	ev, _ := env.Cluster.Kubectl(ctx, nil, "-n", ns, "get", "events", "--sort-by=.lastTimestamp")
	return strings.TrimSpace(string(out)) + "\n" + lastLines(string(ev), 15)
}

// podNames lists the running (not terminating) pods matching selector, sorted.
func podNames(ctx context.Context, env *Env, ns, selector string) ([]string, error) {
	out, err := kubectl(ctx, env, nil, "-n", ns, "get", "pods", "-l", selector, "-o", "json")
	if err != nil {
		return nil, err
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name              string  `json:"name"`
				DeletionTimestamp *string `json:"deletionTimestamp"`
			} `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("decode pod list: %w", err)
	}
	var names []string
	for _, it := range list.Items {
		if it.Metadata.DeletionTimestamp == nil {
			names = append(names, it.Metadata.Name)
		}
	}
	sort.Strings(names)
	return names, nil
}

// probeGet asks url once from inside a pod (kubectl exec ... /probe get URL).
func probeGet(ctx context.Context, env *Env, ns, pod, url string, headers ...string) (probeLine, error) {
	args := []string{"-n", ns, "exec", pod, "--", "/probe", "get"}
	for _, h := range headers {
		args = append(args, "-H", h)
	}
	out, err := kubectl(ctx, env, nil, append(args, url)...)
	if err != nil {
		return probeLine{}, err
	}
	var l probeLine
	if err := json.Unmarshal(bytes.TrimSpace(out), &l); err != nil {
		return probeLine{}, fmt.Errorf("decode probe output %q: %w", out, err)
	}
	return l, nil
}

// rolloutStatus waits for the DaemonSet's rollout.
func rolloutStatus(ctx context.Context, env *Env, timeout time.Duration) error {
	_, err := kubectl(ctx, env, nil, "-n", deployNamespace, "rollout", "status", "daemonset/"+daemonSet, "--timeout="+timeout.String())
	if err != nil {
		return fmt.Errorf("%w\n%s", err, describePods(ctx, env, deployNamespace, "app.kubernetes.io/name=metaconceal"))
	}
	return nil
}

// proxyLogs returns the proxy containers' logs on every node.
func proxyLogs(ctx context.Context, env *Env) (string, error) {
	out, err := kubectl(ctx, env, nil, "-n", deployNamespace, "logs", "-l", "app.kubernetes.io/name=metaconceal", "-c", "proxy", "--tail=-1")
	return string(out), err
}

// primaryConflist finds the file a runtime loads from a node's conf dir: the first
// (by name) regular file ending in .conflist, .conf or .json, as libcni's ConfFiles.
func primaryConflist(ctx context.Context, env *Env, node string) (NodeFile, error) {
	dir := env.Cluster.Paths().CNIConfDir
	out, err := env.Cluster.NodeExec(ctx, node, "ls", "-1A", dir)
	if err != nil {
		return NodeFile{}, fmt.Errorf("list %s on %s: %w", dir, node, err)
	}
	var names []string
	for _, n := range strings.Fields(string(out)) {
		switch filepath.Ext(n) {
		case ".conflist", ".conf", ".json":
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return NodeFile{}, fmt.Errorf("no CNI config in %s on %s", dir, node)
	}
	p := filepath.Join(dir, names[0])
	data, err := env.Cluster.NodeReadFile(ctx, node, p)
	if err != nil {
		return NodeFile{}, err
	}
	return NodeFile{Path: p, Data: data}, nil
}

// entryOf returns the metaconceal entry of a conflist (nil when absent).
func entryOf(data []byte) (map[string]any, error) {
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("decode conflist: %w", err)
	}
	for _, p := range list.Plugins {
		if p["type"] == "metaconceal" {
			return p, nil
		}
	}
	return nil, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
