//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
)

// The proxy's lifecycle changes the whole node, so each test here has a node of its own.

// With the proxy stopped, pods (with their rules and with them flushed) get connection
// refused, for kube-env and project-id alike, and nothing of theirs reaches the
// metadata server; after a restart the same pods, not re-created, work again.
func TestProxyStoppedFailsClosed(t *testing.T) {
	e := setup(t, false)
	ctx := context.Background()
	pods := []pod{e.newPod(t, tenantNS, "web-a", false), e.flushedPod(t, "attacker")}
	if err := e.StopProxy(); err != nil {
		t.Fatalf("stop proxy: %v", err)
	}
	logBefore := e.FakeLogSize()
	for _, p := range pods {
		r := harness.MetadataGet(ctx, p.netns, metadataURL+kubeEnvPath)
		e.requireNoSecret(t, p.name+" with the proxy down", r)
		if r.Exit != 7 {
			t.Errorf("%s with the proxy down: want connection refused (curl exit 7), got %s", p.name, r)
		}
		r = harness.MetadataGet(ctx, p.netns, metadataURL+projectIDPath)
		if r.Exit != 7 {
			t.Errorf("%s with the proxy down: project-id must fail closed too, got %s", p.name, r)
		}
	}
	if direct := e.directRequests(t, logBefore, nil); len(direct) != 0 {
		t.Errorf("with the proxy down, pods reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
	}
	if err := e.StartProxy(ctx); err != nil {
		t.Fatalf("restart proxy: %v", err)
	}
	for _, p := range pods {
		e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
		r := harness.MetadataGet(ctx, p.netns, metadataURL+projectIDPath)
		if r.Status != 200 || r.Body != e.ProjectID {
			t.Errorf("%s after the proxy restart: project-id want 200 %q, got %s", p.name, e.ProjectID, r)
		}
	}
}

// metaconceal-proxy --remove-host-guard, on a node that ran a pod, leaves no rule of
// ours in the node netns (iptables-save, ip6tables-save, nft and legacy).
func TestRemoveHostGuard(t *testing.T) {
	e := setup(t, false)
	p := e.newPod(t, tenantNS, "web-a", false)
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
	if rules := rulesOfOurs(t, e.NS.Path); rules == "" {
		t.Fatalf("no guard rule in the node netns before removal; the check below would prove nothing")
	}
	if err := e.StopProxy(); err != nil {
		t.Fatalf("stop proxy: %v", err)
	}
	if err := e.RemoveHostGuard(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rules := rulesOfOurs(t, e.NS.Path); rules != "" {
		t.Errorf("rules of ours left in the node netns:\n%s", rules)
	}
}
