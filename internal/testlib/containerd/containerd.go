// Package containerd is what the two harnesses that run a real containerd on a
// simulated node share: internal/testlib/harness (the runtime e2e, containerd and
// crictl only) and test/cluster/local (the cluster e2e, containerd under a kubelet).
// It starts node component processes in the node's netns (Proc), writes containerd's
// and crictl's configuration, and removes what containerd leaves outside its own
// directories, tracked by id: never a blanket delete, since another containerd may
// share those directories.
package containerd

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// ConfigParams is what differs between two containerd configurations.
type ConfigParams struct {
	Dir        string // root, state, opt and the runc root live under it
	Socket     string // the gRPC socket; the ttrpc one is Socket + ".ttrpc"
	PauseImage string // sandbox_image
	CNIBinDir  string
	CNIConfDir string // holds the one conflist containerd loads (max_conf_num = 1)
	// DisableAppArmor turns off the CRI plugin's AppArmor profile for containers (the
	// cluster e2e's kubelet-run pods).
	DisableAppArmor bool
}

// Config renders containerd's config.toml (version 2, the CRI plugin with runc).
func Config(p ConfigParams) string {
	apparmor := ""
	if p.DisableAppArmor {
		apparmor = "\n  disable_apparmor = true"
	}
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  restrict_oom_score_adj = true%[10]s
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Sandbox netns bind mounts under our state dir, not /var/run/netns: nothing of this
  # runtime mixes with another run's or the host containerd's cni-* there.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %[7]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[8]q
    conf_dir = %[9]q
    max_conf_num = 1
`, filepath.Join(p.Dir, "root"), filepath.Join(p.Dir, "state"), p.Socket, p.Socket+".ttrpc",
		filepath.Join(p.Dir, "opt"), p.PauseImage, filepath.Join(p.Dir, "runc"), p.CNIBinDir, p.CNIConfDir, apparmor)
}

// CrictlConfig renders a crictl.yaml pointing at socket.
func CrictlConfig(socket string) string {
	return fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", socket, socket)
}

// cgroupRoot is where the cgroup hierarchies are mounted (a variable for the tests).
var cgroupRoot = "/sys/fs/cgroup"

// CgroupDirs lists the mounted cgroup hierarchies (v1 controllers, the unified one) and
// the cgroup root itself (a v2-only machine).
func CgroupDirs() []string {
	entries, err := os.ReadDir(cgroupRoot)
	if err != nil {
		return nil
	}
	var dirs []string
	for _, e := range entries {
		// On a v2-only machine the root holds the k8s.io parent itself, no hierarchy.
		if e.IsDir() && e.Name() != "k8s.io" {
			dirs = append(dirs, filepath.Join(cgroupRoot, e.Name()))
		}
	}
	return append(dirs, cgroupRoot)
}

// MissingK8sCgroups lists the k8s.io cgroup parents that do not exist yet (AcquireLease
// records them as created by test runtimes).
func MissingK8sCgroups() []string {
	var missing []string
	for _, dir := range CgroupDirs() {
		k8s := filepath.Join(dir, "k8s.io")
		if _, err := os.Stat(k8s); errors.Is(err, os.ErrNotExist) {
			missing = append(missing, k8s)
		}
	}
	return missing
}

// RemoveOutside removes what the containerd serving socket left outside its own
// directories for the sandboxes and containers ids, and only that: libcni's result
// cache for network and for the loopback network containerd adds to each sandbox, the
// shims' sockets (containerd names them sha256(<address>/<namespace>/<id>)), runc
// state under the default root (in case a runc ran without our Root option) and the
// per-id k8s.io cgroups. The shared parents are the last Lease's to remove.
func RemoveOutside(socket, network string, ids []string) []error {
	ids = slices.Compact(slices.Sorted(slices.Values(ids)))
	var errs []error
	var stale []string
	if network != "" {
		stale, _ = filepath.Glob(filepath.Join("/var/lib/cni/results", network+"-*"))
	}
	for _, id := range ids {
		sum := sha256.Sum256([]byte(filepath.Join(socket, "k8s.io", id)))
		stale = append(stale,
			filepath.Join("/var/lib/cni/results", "cni-loopback-"+id+"-lo"),
			filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:])),
			filepath.Join("/run/containerd/runc/k8s.io", id))
	}
	for _, p := range stale {
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	for _, dir := range CgroupDirs() {
		for _, id := range ids {
			p := filepath.Join(dir, "k8s.io", id)
			if err := syscall.Rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
			}
		}
	}
	return errs
}

// MountsUnder lists the mount points at or below dir, in mount order.
func MountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return []string{"(mountinfo: " + err.Error() + ")"}
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	return points
}

// UnmountUnder detaches every mount point at or below dir, deepest first (containerd's
// root holds overlay mounts of the sandboxes' rootfs, its state dir their netns).
func UnmountUnder(dir string) []error {
	points := MountsUnder(dir)
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", points[i], err))
		}
	}
	return errs
}
