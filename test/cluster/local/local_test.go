package local

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestWriteOverlays renders the checked-in overlays for a run and checks that every
// placeholder is replaced, that conf/deploy is named by a relative path (kustomize
// refuses an absolute one) that resolves to the repository's conf/deploy, and that
// the node-specific paths point into the run's dir.
func TestWriteOverlays(t *testing.T) {
	t.Parallel()
	repo, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &Cluster{cfg: Config{RepoRoot: repo, Log: io.Discard}, Dir: dir, nodeRoot: filepath.Join(dir, "node"), socket: filepath.Join(dir, "containerd", "containerd.sock")}
	if err := c.writeOverlays(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, o := range []struct{ dir, resource string }{
		{c.DeployDir(), "conf/deploy"},
		{c.UninstallDir(), "conf/deploy/uninstall"},
	} {
		data, err := os.ReadFile(filepath.Join(o.dir, "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		for _, placeholder := range []string{"REPO_ROOT", "/NODE_ROOT", "/CONTAINERD_SOCKET", "/CONTAINERD_NETNS"} {
			if bytes.Contains(data, []byte(placeholder)) {
				t.Errorf("%s: %s left in\n%s", o.dir, placeholder, data)
			}
		}
		var res string
		lines := strings.Split(string(data), "\n")
		if i := slices.Index(lines, "resources:"); i >= 0 && i+1 < len(lines) {
			res = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(lines[i+1]), "- "))
		}
		if filepath.IsAbs(res) || filepath.Clean(filepath.Join(o.dir, res)) != filepath.Join(repo, o.resource) {
			t.Errorf("%s: resource %q, want a relative path to %s", o.dir, res, filepath.Join(repo, o.resource))
		}
		if !bytes.Contains(data, []byte("path: "+filepath.Join(c.nodeRoot, "opt/cni/bin")+",")) {
			t.Errorf("%s: the CNI bin dir is not the run's:\n%s", o.dir, data)
		}
	}
	// The Helm pass's values: the same node-specific paths, no placeholder left.
	values, err := os.ReadFile(c.HelmValues())
	if err != nil {
		t.Fatal(err)
	}
	for _, placeholder := range []string{"/NODE_ROOT", "/CONTAINERD_SOCKET", "/CONTAINERD_NETNS"} {
		if bytes.Contains(values, []byte(placeholder)) {
			t.Errorf("%s: %s left in\n%s", c.HelmValues(), placeholder, values)
		}
	}
	for _, want := range []string{"binDir: " + filepath.Join(c.nodeRoot, "opt/cni/bin"), "criSocket: " + c.socket, "netnsDir: " + c.netnsDir()} {
		if !bytes.Contains(values, []byte(want)) {
			t.Errorf("%s lacks %q:\n%s", c.HelmValues(), want, values)
		}
	}
	deploy, _ := os.ReadFile(filepath.Join(c.DeployDir(), "kustomization.yaml"))
	for _, want := range []string{filepath.Dir(c.socket), c.netnsDir()} {
		if !bytes.Contains(deploy, []byte(want)) {
			t.Errorf("deploy overlay does not name %s:\n%s", want, deploy)
		}
	}
}

// TestMkdirTracked: only the directories a run creates are remembered, deepest first,
// so that Close removes exactly those (when empty).
func TestMkdirTracked(t *testing.T) {
	t.Parallel()
	base := t.TempDir()
	if err := os.Mkdir(filepath.Join(base, "a"), 0o755); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{}
	if err := c.mkdirTracked(filepath.Join(base, "a", "b", "c")); err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(base, "a", "b", "c"), filepath.Join(base, "a", "b")}
	if !slices.Equal(c.createdDirs, want) {
		t.Errorf("created %v, want %v", c.createdDirs, want)
	}
	if err := c.mkdirTracked(filepath.Join(base, "a", "b")); err != nil || len(c.createdDirs) != 2 {
		t.Errorf("an existing dir was tracked again: %v, %v", c.createdDirs, err)
	}
}

// TestConfigsNameTheRun: the generated component configs point at the run's own
// paths, never at the machine's shared ones.
func TestConfigsNameTheRun(t *testing.T) {
	t.Parallel()
	dir := "/tmp/metaconceal-cluster-test"
	c := &Cluster{Dir: dir, nodeRoot: dir + "/node", socket: dir + "/containerd/containerd.sock", network: "mc-e2e-test", cfg: Config{PauseRef: "localhost/pause:x"}}
	for name, cfg := range map[string]string{
		"containerd": c.containerdConfig(),
		"kubelet":    c.kubeletConfig(),
		"conflist":   c.mainCNIConflist(),
	} {
		for _, shared := range []string{"/var/lib/containerd", "/run/containerd/containerd.sock", "/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni/networks", "/var/lib/kubelet"} {
			if strings.Contains(cfg, `"`+shared) {
				t.Errorf("%s config names the shared %s:\n%s", name, shared, cfg)
			}
		}
		if !strings.Contains(cfg, dir) {
			t.Errorf("%s config does not name the run dir:\n%s", name, cfg)
		}
	}
	if !strings.Contains(c.containerdConfig(), "netns_mounts_under_state_dir = true") {
		t.Error("containerd would pin sandbox netns under /var/run/netns, shared with other runtimes")
	}
}
