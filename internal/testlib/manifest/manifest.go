// Package manifest reads Kubernetes manifests for tests: conf/deploy's (checked beside
// it, in conf/deploy, and by the installer's tests for its own arguments) and the kind
// e2e's. Documents are decoded strictly into the API types by the callers, so a
// misspelled or misplaced field fails a test rather than a cluster.
package manifest

import (
	"os"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// ReadDocs splits a YAML file into documents and checks each has apiVersion and kind.
func ReadDocs(t testing.TB, path string) [][]byte {
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

// Decode decodes a document strictly (unknown and duplicate fields fail) into v.
func Decode(t testing.TB, what string, doc []byte, v any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// DaemonSetPodSpec decodes the DaemonSet that is the first document of the file at
// path and returns its pod template's spec.
func DaemonSetPodSpec(t testing.TB, path string) corev1.PodSpec {
	t.Helper()
	var ds appsv1.DaemonSet
	Decode(t, path, ReadDocs(t, path)[0], &ds)
	return ds.Spec.Template.Spec
}

// MountedAt is c's volume mount at path, or nil.
func MountedAt(c corev1.Container, path string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if m.MountPath == path {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// Containers maps a pod spec's containers (not the init containers) by name.
func Containers(spec corev1.PodSpec) map[string]corev1.Container {
	byName := map[string]corev1.Container{}
	for _, c := range spec.Containers {
		byName[c.Name] = c
	}
	return byName
}
