//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
)

// metadata.google.internal resolved through the pod's own hosts file, with the entry
// GKE puts there, as a container of the pod would resolve it: concealed for a pod with
// its rules and for one that flushed them.
func TestMetadataHostnameViaHostsFile(t *testing.T) {
	e := shared(t, "unshare", "mount")
	ctx := context.Background()
	for _, p := range []pod{e.newPod(t, tenantNS, "hosts-plain", false), e.flushedPod(t, "hosts-flushed")} {
		hosts, err := e.RT.AddMetadataHost(p.id)
		if err != nil {
			t.Errorf("%s: %v", p.name, err)
			continue
		}
		for _, path := range []string{kubeEnvPath, identityPath} {
			r := harness.MetadataGetWithHosts(ctx, p.netns, hosts, "http://metadata.google.internal"+path)
			e.requireNoSecret(t, p.name+" metadata.google.internal", r)
			// A 403 from the proxy also proves the name resolved (no DNS answers it here).
			if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
				t.Errorf("%s http://metadata.google.internal%s via %s: want 403 %q, got %s", p.name, path, hosts, concealedBody, r)
			}
		}
	}
}
