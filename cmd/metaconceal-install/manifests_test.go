package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The manifests are decoded strictly into the Kubernetes API types, so a misspelled or
// misplaced field fails here rather than on a cluster; the installer's arguments are
// parsed by the installer's own flag set.

const deployDir = "../../conf/deploy"

// readDocs splits a YAML file into documents and checks each has apiVersion and kind.
func readDocs(t *testing.T, path string) [][]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var docs [][]byte
	for doc := range strings.SplitSeq(string(data), "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if head.APIVersion == "" || head.Kind == "" {
			t.Fatalf("%s: a document without apiVersion or kind", path)
		}
		docs = append(docs, []byte(doc))
	}
	return docs
}

func TestKustomizationsListExistingFiles(t *testing.T) {
	t.Parallel()
	for _, dir := range []string{deployDir, filepath.Join(deployDir, "uninstall")} {
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
		docs := readDocs(t, filepath.Join(dir, "kustomization.yaml"))
		if err := yaml.UnmarshalStrict(docs[0], &k); err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		if len(k.Images) != 1 || k.Images[0].Name != "metaconceal" {
			t.Errorf("%s: images %+v, want one entry for metaconceal", dir, k.Images)
		}
		for _, r := range k.Resources {
			for _, doc := range readDocs(t, filepath.Join(dir, r)) {
				var meta struct {
					Metadata struct{ Namespace, Name string } `json:"metadata"`
					Kind     string                           `json:"kind"`
				}
				if err := yaml.Unmarshal(doc, &meta); err != nil {
					t.Fatal(err)
				}
				if meta.Kind != "Namespace" && meta.Metadata.Namespace != k.Namespace {
					t.Errorf("%s/%s: namespace %q, kustomization says %q", dir, r, meta.Metadata.Namespace, k.Namespace)
				}
			}
		}
	}
}

func TestDaemonSet(t *testing.T) {
	t.Parallel()
	docs := readDocs(t, filepath.Join(deployDir, "daemonset.yaml"))
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(docs[0], &ds); err != nil {
		t.Fatalf("daemonset.yaml: %v", err)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("hostNetwork %v, priorityClassName %q", spec.HostNetwork, spec.PriorityClassName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v, want one that tolerates every taint", spec.Tolerations)
	}
	if len(spec.InitContainers) != 1 {
		t.Fatalf("%d init containers, want the installer", len(spec.InitContainers))
	}
	checkInstaller(t, spec.InitContainers[0], true)
	byName := map[string]corev1.Container{}
	for _, c := range spec.Containers {
		byName[c.Name] = c
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("container %s lacks requests or limits", c.Name)
		}
		checkMountsHaveVolumes(t, spec, c)
	}
	checkMountsHaveVolumes(t, spec, spec.InitContainers[0])
	checkInstaller(t, byName["keep-entry"], false)

	proxy, ok := byName["proxy"]
	if !ok {
		t.Fatal("no proxy container")
	}
	if !slices.Contains(proxy.Command, "--host-guard") {
		t.Errorf("proxy command %v lacks --host-guard", proxy.Command)
	}
	for probe, path := range map[*corev1.Probe]string{proxy.ReadinessProbe: "/readyz", proxy.LivenessProbe: "/healthz"} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path || probe.HTTPGet.Host != "127.0.0.1" || probe.HTTPGet.Port.IntValue() != 989 {
			t.Errorf("probe for %s: %+v; want httpGet 127.0.0.1:989%s", path, probe, path)
		}
	}
	if !slices.Contains(proxy.Command, "--metrics-listen=127.0.0.1:989") {
		t.Errorf("the probes assume --metrics-listen=127.0.0.1:989: %v", proxy.Command)
	}
	caps := proxy.SecurityContext.Capabilities
	if caps == nil || !slices.Contains(caps.Add, "NET_ADMIN") {
		t.Errorf("proxy capabilities %+v lack NET_ADMIN", caps)
	}
}

func TestUninstallDaemonSet(t *testing.T) {
	t.Parallel()
	docs := readDocs(t, filepath.Join(deployDir, "uninstall", "daemonset.yaml"))
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(docs[0], &ds); err != nil {
		t.Fatalf("uninstall/daemonset.yaml: %v", err)
	}
	spec := ds.Spec.Template.Spec
	if len(spec.InitContainers) != 2 {
		t.Fatalf("%d init containers, want installer then guard removal", len(spec.InitContainers))
	}
	inst := spec.InitContainers[0]
	o, err := parseFlags(inst.Command[1:], io.Discard)
	if err != nil || !o.uninstall {
		t.Errorf("installer command %v: %+v, %v; want --uninstall", inst.Command, o, err)
	}
	if !slices.Contains(spec.InitContainers[1].Command, "--remove-host-guard") {
		t.Errorf("second init container %v lacks --remove-host-guard", spec.InitContainers[1].Command)
	}
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		checkMountsHaveVolumes(t, spec, c)
	}
}

// checkInstaller parses the container's arguments with the installer's flag set.
func checkInstaller(t *testing.T, c corev1.Container, once bool) {
	t.Helper()
	if len(c.Command) == 0 || filepath.Base(c.Command[0]) != "metaconceal-install" {
		t.Fatalf("container %q command %v is not the installer", c.Name, c.Command)
	}
	var stderr bytes.Buffer
	o, err := parseFlags(c.Command[1:], &stderr)
	if err != nil {
		t.Fatalf("container %q: installer flags %v: %v %s", c.Name, c.Command[1:], err, stderr.String())
	}
	if o.once != once || o.uninstall || o.uninstallOn {
		t.Errorf("container %q: once=%v uninstall=%v uninstall-on-exit=%v; want once=%v and no uninstall", c.Name, o.once, o.uninstall, o.uninstallOn, once)
	}
	mounted := map[string]bool{}
	for _, m := range c.VolumeMounts {
		mounted[m.MountPath] = true
	}
	if !mounted[o.binDir] || !mounted[o.confDir] {
		t.Errorf("container %q: --cni-bin-dir %s / --cni-conf-dir %s are not mounts %v", c.Name, o.binDir, o.confDir, c.VolumeMounts)
	}
	if err := validateEntry(entryOf(o)); err != nil {
		t.Errorf("container %q: entry rejected: %v", c.Name, err)
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

// TestKindFakeMetadata checks the kind e2e's fake metadata DaemonSet decodes and puts
// the metadata address on lo before serving on it.
func TestKindFakeMetadata(t *testing.T) {
	t.Parallel()
	docs := readDocs(t, "../../test/kind/fake-metadata.yaml")
	var ns corev1.Namespace
	if err := yaml.UnmarshalStrict(docs[0], &ns); err != nil {
		t.Fatalf("namespace: %v", err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(docs[1], &ds); err != nil {
		t.Fatalf("daemonset: %v", err)
	}
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
