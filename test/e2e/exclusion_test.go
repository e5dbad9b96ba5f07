//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
)

// A pod in an excluded namespace (the conflist's excludeNamespaces: kube-system) gets
// no rule of ours, the exclusion is logged, and it reads the full kube-env: the host
// guard redirects it to the proxy, which serves it as an exposed pod.
func TestExcludedNamespace(t *testing.T) {
	e := shared(t)
	p := e.newPod(t, excludedNS, "system-agent", false)
	logs := readFile(t, e.PluginLog) + readFile(t, e.RT.LogPath)
	if !logMentions(logs, excludedNS, "exclu") {
		t.Errorf("no log line of the plugin (%s) or containerd names the exclusion of %s", e.PluginLog, excludedNS)
	}
	if rules := rulesOfOurs(t, p.netns); rules != "" {
		t.Errorf("the plugin put rules in the excluded pod's netns:\n%s", rules)
	}
	r := harness.MetadataGet(context.Background(), p.netns, metadataURL+kubeEnvPath)
	if r.Status != 200 || r.Body != e.KubeEnv {
		// With no rule in the pod, what else stands between it and the metadata
		// server is the proxy's node-wide guard, which redirects every pod.
		t.Errorf("kube-env from a pod in excluded namespace %s: want the full value, got %s "+
			"(the pod has no rule of ours; --host-guard redirected it to the proxy)", excludedNS, r)
	}
}

func logMentions(text, namespace, word string) bool {
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, namespace) && strings.Contains(strings.ToLower(line), word) {
			return true
		}
	}
	return false
}
