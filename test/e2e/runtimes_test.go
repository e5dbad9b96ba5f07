//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
)

// Two runtimes alive on one machine at once, as `go test` runs this package and
// test/e2e/nodeagent side by side, each with a containerd of its own: stopping one
// while the other runs a pod reports no error, the other's pod keeps running in its
// cgroup, and the other still starts pods afterwards. (The first runtime to stop used
// to remove the shared k8s.io cgroup parents from under the other: EBUSY, a failed
// run.)
func TestTwoRuntimesStopIndependently(t *testing.T) {
	begin(t)
	ctx := context.Background()
	start := func(name string) *harness.Node {
		n, err := harness.StartNode(ctx, harness.NodeConfig{})
		if err != nil {
			t.Fatalf("node %s: %v", name, err)
		}
		closed := false
		t.Cleanup(func() {
			if !closed {
				if err := n.Close(); err != nil {
					t.Errorf("cleanup of node %s: %v", name, err)
				}
			}
		})
		return n
	}
	a, b := start("a"), start("b")
	podA, err := a.StartPod(ctx, harness.PodSpec{Name: "on-a", Namespace: tenantNS})
	if err != nil {
		t.Fatalf("pod on a: %v", err)
	}
	podB, err := b.StartPod(ctx, harness.PodSpec{Name: "on-b", Namespace: tenantNS})
	if err != nil {
		t.Fatalf("pod on b: %v", err)
	}
	for _, p := range []harness.Pod{podA, podB} {
		if err := inItsCgroup(p); err != nil {
			t.Fatalf("before any stop: %v", err)
		}
	}

	// Stop a, pod and all, while b's pod runs.
	if err := a.Close(); err != nil {
		t.Errorf("stopping runtime a while b runs a pod: %v", err)
	}
	if err := syscall.Kill(podA.Sandbox.PID, 0); err == nil {
		t.Errorf("a's sandbox process %d still runs after a stopped", podA.Sandbox.PID)
	}
	if err := inItsCgroup(podB); err != nil {
		t.Errorf("after a stopped: %v", err)
	}
	out, err := b.RT.Crictl(ctx, "inspectp", "-o", "go-template", "--template", "{{.status.state}}", podB.ID)
	if err != nil || strings.TrimSpace(out) != "SANDBOX_READY" {
		t.Errorf("b's pod after a stopped: state %q (%v), want SANDBOX_READY", strings.TrimSpace(out), err)
	}
	// b still makes pods: its cgroup parents are there.
	podB2, err := b.StartPod(ctx, harness.PodSpec{Name: "on-b-later", Namespace: tenantNS})
	if err != nil {
		t.Fatalf("a new pod on b after a stopped: %v", err)
	}
	if err := inItsCgroup(podB2); err != nil {
		t.Errorf("new pod on b: %v", err)
	}
}

// inItsCgroup checks that a sandbox's process runs and sits in a k8s.io/<sandbox id>
// cgroup (containerd's CRI places a sandbox whose config names no cgroup parent under
// /k8s.io/<id>), in every hierarchy it lists.
func inItsCgroup(p harness.Pod) error {
	if p.Sandbox.PID <= 0 {
		return fmt.Errorf("pod %s: no sandbox pid", p.Name)
	}
	if err := syscall.Kill(p.Sandbox.PID, 0); err != nil {
		return fmt.Errorf("pod %s: sandbox process %d: %w", p.Name, p.Sandbox.PID, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.Sandbox.PID))
		if err != nil {
			return fmt.Errorf("pod %s: %w", p.Name, err)
		}
		var off []string
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			// hierarchy-id:controllers:path; the systemd named hierarchy and the
			// unified one may hold the process elsewhere on a hybrid machine.
			f := strings.SplitN(line, ":", 3)
			if len(f) == 3 && f[1] != "" && !strings.HasPrefix(f[1], "name=") && f[2] != "/k8s.io/"+p.ID {
				off = append(off, line)
			}
		}
		if len(off) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pod %s (sandbox process %d) not in /k8s.io/%s: %s", p.Name, p.Sandbox.PID, p.ID, strings.Join(off, "; "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
