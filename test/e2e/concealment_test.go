//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// A plain pod in a tenant namespace: kube-env and the identity token concealed,
// project-id and the OAuth token served, the state record naming the pod.
func TestConcealedPod(t *testing.T) {
	e := shared(t)
	ctx := context.Background()
	p := e.newPod(t, tenantNS, "web-a", false)
	// The runtime pins sandbox netns under its own state dir, so its cleanup never
	// has to touch another runtime's /var/run/netns/cni-*.
	if !strings.HasPrefix(p.netns, e.Dir+"/") {
		t.Errorf("sandbox netns %s is outside the test's dir %s", p.netns, e.Dir)
	}
	t.Logf("sandbox netns %s", p.netns)
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
	e.requireConcealed(t, p.netns, metadataURL+identityPath)
	r := harness.MetadataGet(ctx, p.netns, metadataURL+projectIDPath)
	if r.Status != 200 || r.Body != e.ProjectID {
		t.Errorf("project-id from the pod: want 200 %q, got %s", e.ProjectID, r)
	}
	r = harness.MetadataGet(ctx, p.netns, metadataURL+tokenPath)
	if r.Status != 200 || !strings.Contains(r.Body, "access_token") {
		t.Errorf("token from the pod: want 200 with an access_token, got %s", r)
	}
	rec, err := state.Read(e.StateDir, p.id, "eth0")
	if err != nil {
		t.Fatalf("state record of the pod: %v", err)
	}
	if rec.PodNamespace != tenantNS || rec.PodName != "web-a" {
		t.Errorf("state record names %s/%s, want %s/web-a", rec.PodNamespace, rec.PodName, tenantNS)
	}
}

// The proxy's audit line for a concealed request names the pod behind it.
func TestAuditLineNamesPod(t *testing.T) {
	e := shared(t)
	p := e.newPod(t, tenantNS, "audit-target", false)
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
	lines := matchingLines(readFile(t, e.ProxyLog), tenantNS, "audit-target", "kube-env")
	if len(lines) == 0 {
		t.Errorf("no proxy log line names %s, audit-target and kube-env; log:\n%s", tenantNS, harness.Tail(e.ProxyLog, 20))
	} else {
		t.Logf("audit line: %s", lines[0])
	}
}
