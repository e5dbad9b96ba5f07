package scenario

import (
	"fmt"
	"strings"
)

// The scenarios' workloads are all the probe image (test/cluster/probe) in a pod of
// the same shape; these build their manifests (text/template sources for apply).

// namespaceDoc starts every manifest with its namespace, so that each scenario also
// runs alone (--scenarios). ns is a template reference such as {{.WorkloadNamespace}}.
func namespaceDoc(ns string) string {
	return "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: " + ns + "\n---\n"
}

// probeSpec is what differs between the scenarios' probe pods.
type probeSpec struct {
	HostNetwork bool
	TolerateAll bool   // tolerate every taint (as a DaemonSet would)
	Command     string // the container's command, YAML flow style; default ["/probe", "idle"]
	// CPURequest, when set, is the container's CPU request: without one the pod is
	// BestEffort (cpu.shares 2) and, on a busy node, a measuring client waits for a
	// CPU longer than for the answers it measures.
	CPURequest string
}

// podSpec renders the pod spec at indent.
func (s probeSpec) podSpec(indent string) string {
	var b strings.Builder
	if s.HostNetwork {
		b.WriteString(indent + "hostNetwork: true\n")
	}
	b.WriteString(indent + "terminationGracePeriodSeconds: 2\n")
	if s.TolerateAll {
		b.WriteString(indent + "tolerations:\n" + indent + "  - operator: Exists\n")
	}
	command := s.Command
	if command == "" {
		command = `["/probe", "idle"]`
	}
	fmt.Fprintf(&b, "%[1]scontainers:\n%[1]s  - name: probe\n%[1]s    image: {{.ProbeImage}}\n%[1]s    imagePullPolicy: Never\n%[1]s    command: %[2]s\n",
		indent, command)
	if s.CPURequest != "" {
		fmt.Fprintf(&b, "%[1]s    resources:\n%[1]s      requests: {cpu: %[2]s}\n", indent, s.CPURequest)
	}
	return b.String()
}

// probePod is a Pod name (labelled app=name) in ns.
func probePod(name, ns string, s probeSpec) string {
	return fmt.Sprintf("apiVersion: v1\nkind: Pod\nmetadata:\n  name: %[1]s\n  namespace: %[2]s\n  labels: {app: %[1]s}\nspec:\n", name, ns) +
		s.podSpec("  ")
}

// probeDeployment is a Deployment name of replicas probe pods (labelled app=name) in ns.
func probeDeployment(name, ns string, replicas int, s probeSpec) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[1]s
  namespace: %[2]s
spec:
  replicas: %[3]d
  selector:
    matchLabels: {app: %[1]s}
  template:
    metadata:
      labels: {app: %[1]s}
    spec:
`, name, ns, replicas) + s.podSpec("      ")
}
