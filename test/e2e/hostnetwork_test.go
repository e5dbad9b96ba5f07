//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// A hostNetwork pod shares the node's netns: CNI never runs for it, and it reads
// everything, as the node does.
func TestHostNetworkPod(t *testing.T) {
	e := shared(t)
	p := e.newPod(t, tenantNS, "host-net", true)
	if p.sb.NetnsPath != "" {
		t.Fatalf("hostNetwork sandbox has its own netns %s", p.sb.NetnsPath)
	}
	if calls := e.cniCallsFor(t, p.id); len(calls) != 0 {
		t.Errorf("metaconceal was called for the hostNetwork sandbox: %q", calls)
	}
	if _, err := state.Read(e.StateDir, p.id, "eth0"); err == nil {
		t.Errorf("a state record exists for the hostNetwork sandbox")
	}
	// A hostNetwork sandbox shares the node's netns (containerd runs in it): check
	// that, then ask from the sandbox process's own netns.
	sandboxNetns := fmt.Sprintf("/proc/%d/ns/net", p.sb.PID)
	if same, err := harness.SameNetns(sandboxNetns, e.NS.Path); err != nil || !same {
		t.Fatalf("hostNetwork sandbox (pid %d) is not in the node netns: same=%v err=%v", p.sb.PID, same, err)
	}
	r := harness.MetadataGet(context.Background(), sandboxNetns, metadataURL+kubeEnvPath)
	if r.Status != 200 || r.Body != e.KubeEnv {
		t.Errorf("kube-env from the hostNetwork pod: want the full value, got %s", r)
	}
}
