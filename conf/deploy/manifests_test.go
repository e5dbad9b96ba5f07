// Package deploy_test checks the manifests beside it: the kustomizations, the
// DaemonSet (installer, keep-entry agent and proxy containers), the uninstall
// DaemonSet, the RBAC and the optional admission policy, each decoded strictly into
// the Kubernetes API types. The installer's arguments in these manifests are parsed by
// the installer's own flag set in cmd/metaconceal-install (manifests_test.go): only
// that package can.
package deploy_test

import (
	"path/filepath"
	"slices"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"github.com/metaconceal/metaconceal/internal/testlib/manifest"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
)

const saTokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func TestKustomizationsListExistingFiles(t *testing.T) {
	t.Parallel()
	for _, dir := range []string{".", "uninstall"} {
		var k struct {
			APIVersion string   `json:"apiVersion"`
			Kind       string   `json:"kind"`
			Namespace  string   `json:"namespace"`
			Resources  []string `json:"resources"`
			Images     []struct {
				Name    string `json:"name"`
				NewName string `json:"newName"`
				NewTag  string `json:"newTag"`
			} `json:"images"`
		}
		docs := manifest.ReadDocs(t, filepath.Join(dir, "kustomization.yaml"))
		manifest.Decode(t, dir, docs[0], &k)
		if len(k.Images) != 1 || k.Images[0].Name != "metaconceal" {
			t.Errorf("%s: images %+v, want one entry for metaconceal", dir, k.Images)
		}
		for _, r := range k.Resources {
			for _, doc := range manifest.ReadDocs(t, filepath.Join(dir, r)) {
				var meta struct {
					Metadata struct{ Namespace, Name string } `json:"metadata"`
					Kind     string                           `json:"kind"`
				}
				if err := yaml.Unmarshal(doc, &meta); err != nil { // other fields too: not strict
					t.Fatal(err)
				}
				clusterScoped := meta.Kind == "Namespace" || meta.Kind == "ClusterRole" || meta.Kind == "ClusterRoleBinding"
				if !clusterScoped && meta.Metadata.Namespace != k.Namespace {
					t.Errorf("%s/%s: namespace %q, kustomization says %q", dir, r, meta.Metadata.Namespace, k.Namespace)
				}
			}
		}
	}
}

// The rolling update opens no window: the new pod starts beside the old one, which
// only works when no container declares a port (hostNetwork turns it into a hostPort,
// kubernetes#106417).
func TestDaemonSetRollingUpdate(t *testing.T) {
	t.Parallel()
	var ds appsv1.DaemonSet
	manifest.Decode(t, "daemonset.yaml", manifest.ReadDocs(t, "daemonset.yaml")[0], &ds)
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil || ru.MaxSurge == nil || ru.MaxUnavailable == nil {
		t.Fatalf("updateStrategy %+v: want RollingUpdate with maxSurge and maxUnavailable", ds.Spec.UpdateStrategy)
	}
	if surge, err := intstr.GetScaledValueFromIntOrPercent(ru.MaxSurge, 1, true); err != nil || surge < 1 {
		t.Errorf("maxSurge %s on a node: %d, %v; want at least 1", ru.MaxSurge.String(), surge, err)
	}
	if ru.MaxUnavailable.String() != "0" {
		t.Errorf("maxUnavailable %s, want 0", ru.MaxUnavailable.String())
	}
	spec := ds.Spec.Template.Spec
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		if len(c.Ports) > 0 {
			t.Errorf("container %s declares ports %+v: the surge pod could not be scheduled", c.Name, c.Ports)
		}
	}
}

func TestDaemonSet(t *testing.T) {
	t.Parallel()
	spec := manifest.DaemonSetPodSpec(t, "daemonset.yaml")
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("hostNetwork %v, priorityClassName %q", spec.HostNetwork, spec.PriorityClassName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v, want one that tolerates every taint", spec.Tolerations)
	}
	if len(spec.InitContainers) != 1 {
		t.Fatalf("%d init containers, want the installer", len(spec.InitContainers))
	}
	byName := manifest.Containers(spec)
	for _, c := range []corev1.Container{spec.InitContainers[0], byName["keep-entry"]} {
		if len(c.Command) == 0 || filepath.Base(c.Command[0]) != "metaconceal-install" {
			t.Errorf("container %q command %v is not the installer", c.Name, c.Command)
		}
	}
	for _, c := range spec.Containers {
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("container %s lacks requests or limits", c.Name)
		}
		checkMountsHaveVolumes(t, spec, c)
	}
	checkMountsHaveVolumes(t, spec, spec.InitContainers[0])

	proxy, ok := byName["proxy"]
	if !ok {
		t.Fatal("no proxy container")
	}
	if !slices.Contains(proxy.Command, "--host-guard") {
		t.Errorf("proxy command %v lacks --host-guard", proxy.Command)
	}
	// The probes ask this pod's proxy on its own socket: the TCP metrics address is
	// shared with the other pod during a rolling update (SO_REUSEPORT).
	const socket = "/tmp/metaconceal-proxy.sock"
	for probe, path := range map[*corev1.Probe]string{proxy.ReadinessProbe: "/readyz", proxy.LivenessProbe: "/healthz"} {
		want := []string{"/metaconceal/metaconceal-proxy", "probe", "--socket=" + socket, "--path=" + path}
		if probe == nil || probe.Exec == nil || !slices.Equal(probe.Exec.Command, want) {
			t.Errorf("probe for %s: %+v; want exec %v", path, probe, want)
		}
	}
	if !slices.Contains(proxy.Command, "--probe-socket="+socket) || manifest.MountedAt(proxy, "/tmp") == nil {
		t.Errorf("the probes assume --probe-socket=%s on a pod-private /tmp: %v", socket, proxy.Command)
	}
	caps := proxy.SecurityContext.Capabilities
	if caps == nil || !slices.Contains(caps.Add, "NET_ADMIN") {
		t.Errorf("proxy capabilities %+v lack NET_ADMIN", caps)
	}
}

// TestDaemonSetNodeAgent checks the wiring of the readiness gate, repair and Events in
// the DaemonSet: the token and the mounts each needs are there, and only there. That
// keep-entry's flags parse, validate and ask for the gate, repair and Events, and that
// the CRI socket and state dir they name are mounted read-write, is checked with the
// installer's flag set (cmd/metaconceal-install).
func TestDaemonSetNodeAgent(t *testing.T) {
	t.Parallel()
	spec := manifest.DaemonSetPodSpec(t, "daemonset.yaml")
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("automountServiceAccountToken %v: want false (the token is mounted only where needed)", spec.AutomountServiceAccountToken)
	}
	tolerated := slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.ToleratesTaint(klog.Background(), &corev1.Taint{Key: nodegate.TaintKey, Effect: corev1.TaintEffectNoSchedule}, false)
	})
	if !tolerated {
		t.Errorf("tolerations %+v do not tolerate the readiness taint", spec.Tolerations)
	}
	for _, c := range spec.InitContainers {
		if manifest.MountedAt(c, saTokenDir) != nil {
			t.Errorf("init container %s mounts the API token; it never talks to the API", c.Name)
		}
	}
	byName := manifest.Containers(spec)
	agent := byName["keep-entry"]
	for path, rw := range map[string]bool{"/run/netns": false, saTokenDir: false, "/run/xtables.lock": true} {
		m := manifest.MountedAt(agent, path)
		switch {
		case m == nil:
			t.Errorf("keep-entry does not mount %s", path)
		case rw && m.ReadOnly:
			t.Errorf("keep-entry mounts %s read-only; the repair writes there", path)
		}
	}
	if m := manifest.MountedAt(agent, "/run/netns"); m != nil && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer) {
		t.Errorf("/run/netns propagation %v: want HostToContainer (the runtime mounts new netns after the container started)", m.MountPropagation)
	}
	if caps := agent.SecurityContext.Capabilities; caps == nil || !slices.Contains(caps.Add, "SYS_ADMIN") || !slices.Contains(caps.Add, "NET_ADMIN") {
		t.Errorf("keep-entry capabilities %+v: --repair=repair needs SYS_ADMIN (setns) and NET_ADMIN (iptables)", caps)
	}

	proxy := byName["proxy"]
	if !slices.Contains(proxy.Command, "--pod-events") || manifest.MountedAt(proxy, saTokenDir) == nil {
		t.Errorf("proxy: --pod-events in %v and the API token mounted: want both", proxy.Command)
	}
	for _, c := range []corev1.Container{agent, proxy} {
		if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
		}) {
			t.Errorf("container %s: no NODE_NAME from spec.nodeName", c.Name)
		}
	}
}

func TestUninstallDaemonSet(t *testing.T) {
	t.Parallel()
	spec := manifest.DaemonSetPodSpec(t, filepath.Join("uninstall", "daemonset.yaml"))
	if len(spec.InitContainers) != 2 {
		t.Fatalf("%d init containers, want installer then guard removal", len(spec.InitContainers))
	}
	if inst := spec.InitContainers[0].Command; len(inst) == 0 || filepath.Base(inst[0]) != "metaconceal-install" {
		t.Errorf("first init container %v: want the installer (its --uninstall: cmd/metaconceal-install)", inst)
	}
	if !slices.Contains(spec.InitContainers[0].Command, "--state-dir=/run/metaconceal") ||
		!slices.ContainsFunc(spec.InitContainers[0].VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == "/run/metaconceal" }) {
		t.Errorf("first init container: want --state-dir=/run/metaconceal mounted (the agent's self-test outcome is removed)")
	}
	if guard := spec.InitContainers[1].Command; len(guard) < 2 || guard[1] != "remove-host-guard" {
		t.Errorf("second init container %v: want metaconceal-proxy remove-host-guard", guard)
	}
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		checkMountsHaveVolumes(t, spec, c)
	}
}

func checkMountsHaveVolumes(t *testing.T, spec corev1.PodSpec, c corev1.Container) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name }) {
			t.Errorf("container %q mounts undefined volume %q", c.Name, m.Name)
		}
	}
}

// TestRBACIsMinimal pins what the service account may do: nodes get/patch (the gate),
// nodes/status patch (the self-test's condition) and events create/patch (Events),
// nothing else.
func TestRBACIsMinimal(t *testing.T) {
	t.Parallel()
	docs := manifest.ReadDocs(t, "rbac.yaml")
	if len(docs) != 2 {
		t.Fatalf("rbac.yaml: %d documents, want a ClusterRole and its binding", len(docs))
	}
	var role rbacv1.ClusterRole
	manifest.Decode(t, "rbac.yaml", docs[0], &role)
	want := map[string][]string{"nodes": {"get", "patch"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}
	got := map[string][]string{}
	for _, r := range role.Rules {
		if !slices.Equal(r.APIGroups, []string{""}) || len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("rule %+v: want the core group, no resource names or URLs", r)
		}
		for _, res := range r.Resources {
			got[res] = append(got[res], r.Verbs...)
		}
	}
	if len(got) != len(want) {
		t.Errorf("rules cover %v, want exactly %v", got, want)
	}
	for res, verbs := range want {
		if !slices.Equal(got[res], verbs) {
			t.Errorf("%s: verbs %v, want %v", res, got[res], verbs)
		}
	}
	var binding rbacv1.ClusterRoleBinding
	manifest.Decode(t, "rbac.yaml", docs[1], &binding)
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 ||
		binding.Subjects[0].Kind != "ServiceAccount" || binding.Subjects[0].Name != "metaconceal" || binding.Subjects[0].Namespace != "metaconceal-system" {
		t.Errorf("binding %+v: want %s bound to the metaconceal service account only", binding, role.Name)
	}
}

// TestOwnNodePolicyDecodes checks that the optional policy is well-formed; the e2e
// (test/e2e/nodeagent) applies it to a real API server and checks what it denies.
func TestOwnNodePolicyDecodes(t *testing.T) {
	t.Parallel()
	path := filepath.Join("optional", "own-node-policy.yaml")
	docs := manifest.ReadDocs(t, path)
	if len(docs) != 2 {
		t.Fatalf("%d documents, want a policy and its binding", len(docs))
	}
	var pol admissionv1.ValidatingAdmissionPolicy
	manifest.Decode(t, path, docs[0], &pol)
	var b admissionv1.ValidatingAdmissionPolicyBinding
	manifest.Decode(t, path, docs[1], &b)
	if b.Spec.PolicyName != pol.Name || !slices.Contains(b.Spec.ValidationActions, admissionv1.Deny) {
		t.Errorf("binding %+v does not enforce %s", b.Spec, pol.Name)
	}
	if pol.Spec.FailurePolicy == nil || *pol.Spec.FailurePolicy != admissionv1.Fail || len(pol.Spec.Validations) == 0 {
		t.Errorf("policy: failurePolicy %v, %d validations: want Fail and some", pol.Spec.FailurePolicy, len(pol.Spec.Validations))
	}
}
