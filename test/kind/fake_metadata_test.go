package kind_test

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/metaconceal/metaconceal/internal/testlib/manifest"
)

// TestKindFakeMetadata checks the kind e2e's fake metadata DaemonSet decodes and puts
// the metadata address on lo before serving on it.
func TestKindFakeMetadata(t *testing.T) {
	t.Parallel()
	const path = "fake-metadata.yaml"
	docs := manifest.ReadDocs(t, path)
	var ns corev1.Namespace
	manifest.Decode(t, path+": namespace", docs[0], &ns)
	var ds appsv1.DaemonSet
	manifest.Decode(t, path+": daemonset", docs[1], &ds)
	spec := ds.Spec.Template.Spec
	if ds.Namespace != ns.Name || !spec.HostNetwork || len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("unexpected shape: namespace %q/%q, hostNetwork %v, %d init, %d containers", ds.Namespace, ns.Name, spec.HostNetwork, len(spec.InitContainers), len(spec.Containers))
	}
	init := spec.InitContainers[0]
	if strings.Join(init.Command, " ") != "ip addr replace 169.254.169.254/32 dev lo" || !slices.Contains(init.SecurityContext.Capabilities.Add, "NET_ADMIN") {
		t.Errorf("init container %v with %+v", init.Command, init.SecurityContext.Capabilities)
	}
	if !slices.Contains(spec.Containers[0].Command, "--listen=169.254.169.254:80") {
		t.Errorf("server command %v", spec.Containers[0].Command)
	}
}
