package main

import (
	"bytes"
	"io"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/metaconceal/metaconceal/internal/testlib/manifest"
	"github.com/metaconceal/metaconceal/pkg/repair"
)

// The manifests themselves are checked beside them (conf/deploy/manifests_test.go);
// what only the installer can check stays here: the installer's arguments in them,
// parsed by its own flag set and validated as it would at start, and the paths those
// arguments name being mounted.

const deployDir = "../../conf/deploy"

func TestDaemonSetInstallerArgs(t *testing.T) {
	t.Parallel()
	spec := manifest.DaemonSetPodSpec(t, filepath.Join(deployDir, "daemonset.yaml"))
	if len(spec.InitContainers) != 1 {
		t.Fatalf("%d init containers, want the installer", len(spec.InitContainers))
	}
	checkInstaller(t, spec.InitContainers[0], true)
	checkInstaller(t, manifest.Containers(spec)["keep-entry"], false)
}

// TestDaemonSetNodeAgentArgs checks keep-entry's agent flags in conf/deploy: they parse
// and validate, ask for the gate, repair, Events and metrics, and the CRI socket and
// state dir they name are mounted read-write.
func TestDaemonSetNodeAgentArgs(t *testing.T) {
	t.Parallel()
	agent := manifest.Containers(manifest.DaemonSetPodSpec(t, filepath.Join(deployDir, "daemonset.yaml")))["keep-entry"]
	if len(agent.Command) == 0 {
		t.Fatal("no keep-entry container")
	}
	var stderr bytes.Buffer
	o, err := parseFlags(agent.Command[1:], &stderr)
	if err != nil {
		t.Fatalf("keep-entry flags: %v %s", err, stderr.String())
	}
	o.agent.kube.NodeName = "node-a" // $NODE_NAME in the pod; conf/deploy checks its source
	if err := o.agent.validate(!o.once && !o.uninstall); err != nil {
		t.Errorf("keep-entry agent flags: %v", err)
	}
	if !o.agent.gate || repair.Mode(o.agent.repair) != repair.ModeRepair || !o.agent.kube.Events || o.agent.metricsListen == "" {
		t.Errorf("keep-entry: gate %v, repair %q, events %v, metrics %q: want the gate, repair=repair, Events and metrics",
			o.agent.gate, o.agent.repair, o.agent.kube.Events, o.agent.metricsListen)
	}
	switch m := manifest.MountedAt(agent, o.agent.stateDir); {
	case m == nil:
		t.Errorf("keep-entry does not mount %s", o.agent.stateDir)
	case m.ReadOnly:
		t.Errorf("keep-entry mounts %s read-only; the repair writes there", o.agent.stateDir)
	}
	// The CRI socket's directory, not the socket file: a restarted runtime makes a new
	// socket, which a file mount would not see (read-only is enough to connect).
	if m := manifest.MountedAt(agent, filepath.Dir(o.agent.criSocket)); m == nil {
		t.Errorf("keep-entry does not mount the directory of %s (mount %+v)", o.agent.criSocket, m)
	}
}

func TestUninstallDaemonSetInstallerArgs(t *testing.T) {
	t.Parallel()
	spec := manifest.DaemonSetPodSpec(t, filepath.Join(deployDir, "uninstall", "daemonset.yaml"))
	if len(spec.InitContainers) == 0 {
		t.Fatal("no init container")
	}
	inst := spec.InitContainers[0]
	o, err := parseFlags(inst.Command[1:], io.Discard)
	if err != nil || !o.uninstall {
		t.Errorf("installer command %v: %+v, %v; want --uninstall", inst.Command, o, err)
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
