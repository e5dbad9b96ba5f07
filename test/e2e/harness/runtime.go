// Package harness runs a real container runtime on a simulated node for the e2e tests:
// containerd (Debian's 1.6) + runc started inside the node's network namespace, with
// every directory it owns under a temp dir, a locally built pause image, and crictl
// pointed at its socket. Close stops every sandbox and removes what containerd leaves
// outside its own directories (its sandboxes' netns bind mounts, CNI cache, runc state,
// cgroups).
package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/test/simnode"
)

// Config describes one runtime instance.
type Config struct {
	Node         *simnode.Node
	Dir          string            // empty temp dir that will hold everything containerd owns
	CNIBinaries  map[string]string // name in the CNI bin dir -> file to copy there
	CNIConflist  []byte            // the one conflist containerd loads (max_conf_num = 1)
	NetworkName  string            // the conflist's name, to find its CNI cache entries
	PauseArchive string            // docker-archive tar of the sandbox image
	CrictlPath   string
}

// Runtime is a running containerd on the node.
type Runtime struct {
	node      *simnode.Node
	Dir       string
	Socket    string
	CNIBinDir string
	LogPath   string
	crictlCfg string
	crictl    string
	network   string

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error

	mu        sync.Mutex
	sandboxes map[string]bool   // every sandbox id created through this runtime
	netns     map[string]string // sandbox id -> its netns bind mount, from inspectp

	k8sCgroups []string // k8s.io cgroup dirs this runtime created
}

// Start writes the config, starts containerd inside the node netns, waits for its CRI
// to answer and imports the pause image. On error everything started is stopped.
func Start(ctx context.Context, cfg Config) (*Runtime, error) {
	r := &Runtime{
		node:      cfg.Node,
		Dir:       cfg.Dir,
		Socket:    filepath.Join(cfg.Dir, "containerd.sock"),
		CNIBinDir: filepath.Join(cfg.Dir, "cni-bin"),
		LogPath:   filepath.Join(cfg.Dir, "containerd.log"),
		crictlCfg: filepath.Join(cfg.Dir, "crictl.yaml"),
		crictl:    cfg.CrictlPath,
		network:   cfg.NetworkName,
		sandboxes: map[string]bool{},
		netns:     map[string]string{},
	}
	confDir := filepath.Join(cfg.Dir, "cni-conf")
	for _, d := range []string{r.CNIBinDir, confDir, filepath.Join(cfg.Dir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	for name, src := range cfg.CNIBinaries {
		if err := copyExecutable(src, filepath.Join(r.CNIBinDir, name)); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-metaconceal-e2e.conflist"), cfg.CNIConflist, 0o644); err != nil {
		return nil, fmt.Errorf("write conflist: %w", err)
	}
	configPath := filepath.Join(cfg.Dir, "containerd.toml")
	if err := os.WriteFile(configPath, []byte(containerdConfig(cfg.Dir, r.Socket, r.CNIBinDir, confDir)), 0o644); err != nil {
		return nil, fmt.Errorf("write containerd config: %w", err)
	}
	crictlYAML := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", r.Socket, r.Socket)
	if err := os.WriteFile(r.crictlCfg, []byte(crictlYAML), 0o644); err != nil {
		return nil, fmt.Errorf("write crictl config: %w", err)
	}
	for _, dir := range cgroupV1Dirs() {
		k8s := filepath.Join(dir, "k8s.io")
		if _, err := os.Stat(k8s); errors.Is(err, os.ErrNotExist) {
			r.k8sCgroups = append(r.k8sCgroups, k8s)
		}
	}

	logFile, err := os.Create(r.LogPath)
	if err != nil {
		return nil, fmt.Errorf("create containerd log: %w", err)
	}
	// nsenter --net, not `ip netns exec`: the latter also gives containerd a private
	// mount namespace, so the netns bind mounts it makes under /var/run/netns for each
	// sandbox would be invisible (and unremovable) from the test's mount namespace.
	r.cmd = exec.Command("nsenter", "--net="+cfg.Node.Path, "containerd", "--config", configPath)
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := r.cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	r.exited = make(chan struct{})
	go func() {
		r.waitErr = r.cmd.Wait()
		logFile.Close()
		close(r.exited)
	}()

	if err := r.waitReady(ctx, 60*time.Second); err != nil {
		return nil, errors.Join(err, r.Close())
	}
	if out, err := r.ctr(ctx, "images", "import", cfg.PauseArchive); err != nil {
		return nil, errors.Join(fmt.Errorf("import pause image: %w (%s)", err, out), r.Close())
	}
	return r, nil
}

func containerdConfig(dir, socket, cniBin, cniConf string) string {
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
  restrict_oom_score_adj = true
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
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), socket, socket+".ttrpc",
		filepath.Join(dir, "opt"), PauseImageRef, filepath.Join(dir, "runc"), cniBin, cniConf)
}

func (r *Runtime) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-r.exited:
			return fmt.Errorf("containerd exited during start (%v); log %s:\n%s", r.waitErr, r.LogPath, tail(r.LogPath, 30))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if _, err := r.Crictl(ctx, "info"); err == nil {
			return nil
		} else {
			lastErr = err
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("containerd CRI not ready after %s: %w; log:\n%s", timeout, lastErr, tail(r.LogPath, 30))
}

// Crictl runs bin/crictl against this runtime and returns its stdout.
func (r *Runtime) Crictl(ctx context.Context, args ...string) (string, error) {
	return simnode.Run(ctx, r.crictl, append([]string{"--config", r.crictlCfg}, args...)...)
}

func (r *Runtime) ctr(ctx context.Context, args ...string) (string, error) {
	return simnode.Run(ctx, "ctr", append([]string{"-a", r.Socket, "-n", "k8s.io"}, args...)...)
}

// PodSpec is the part of a CRI PodSandboxConfig the tests vary.
type PodSpec struct {
	Name, Namespace string
	HostNetwork     bool
}

// RunPod creates a pod sandbox with `crictl runp` and returns its id.
func (r *Runtime) RunPod(ctx context.Context, spec PodSpec) (string, error) {
	uid := spec.Namespace + "-" + spec.Name + "-" + simnode.RandomSuffix()
	logDir := filepath.Join(r.Dir, "pods", uid)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return "", fmt.Errorf("create pod log dir: %w", err)
	}
	sandbox := map[string]any{
		"metadata": map[string]any{
			"name": spec.Name, "namespace": spec.Namespace, "uid": uid, "attempt": 0,
		},
		"log_directory": logDir,
		"linux":         map[string]any{},
	}
	if spec.HostNetwork {
		// NODE network namespace; no hostname, since runc refuses to set one without a
		// private UTS namespace.
		sandbox["linux"] = map[string]any{
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		}
	} else {
		sandbox["hostname"] = spec.Name
	}
	data, err := json.Marshal(sandbox)
	if err != nil {
		return "", fmt.Errorf("encode sandbox config: %w", err)
	}
	path := filepath.Join(logDir, "sandbox.json")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return "", fmt.Errorf("write sandbox config: %w", err)
	}
	out, err := r.Crictl(ctx, "runp", path)
	id := strings.TrimSpace(out)
	if id != "" {
		r.mu.Lock()
		r.sandboxes[id] = true
		r.mu.Unlock()
	}
	if err != nil {
		return id, fmt.Errorf("crictl runp %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	// Learn the sandbox's netns now, while containerd can tell: Close removes it even
	// if containerd dies before the pod is removed.
	if _, err := r.Inspect(ctx, id); err != nil {
		return id, fmt.Errorf("inspect new sandbox %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	return id, nil
}

// Sandbox is what the tests need from `crictl inspectp`.
type Sandbox struct {
	ID        string
	NetnsPath string // empty for a hostNetwork sandbox
	PID       int
	IP        string
}

// Inspect reads a sandbox's netns path, pid and IP from `crictl inspectp`, and
// remembers the netns path as one Close must not leave behind.
func (r *Runtime) Inspect(ctx context.Context, id string) (Sandbox, error) {
	out, err := r.Crictl(ctx, "inspectp", id)
	if err != nil {
		return Sandbox{}, err
	}
	var doc struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			PID         int `json:"pid"`
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return Sandbox{}, fmt.Errorf("decode inspectp %s: %w", id, err)
	}
	sb := Sandbox{ID: id, PID: doc.Info.PID, IP: doc.Status.Network.IP}
	for _, ns := range doc.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			sb.NetnsPath = ns.Path
		}
	}
	if sb.NetnsPath != "" {
		r.mu.Lock()
		r.netns[id] = sb.NetnsPath
		r.mu.Unlock()
	}
	return sb, nil
}

// MetadataHostsLine is the entry GKE puts in a pod's hosts file for the metadata server.
const MetadataHostsLine = "169.254.169.254\tmetadata.google.internal metadata"

// HostsFile is the hosts file containerd's CRI (1.6) wrote for a sandbox, which it
// bind-mounts as /etc/hosts into each of the pod's containers.
func (r *Runtime) HostsFile(id string) string {
	return filepath.Join(r.Dir, "root", "io.containerd.grpc.v1.cri", "sandboxes", id, "hosts")
}

// AddMetadataHost appends MetadataHostsLine to a sandbox's hosts file, as GKE has it in
// every pod's /etc/hosts; the file must exist (the runtime made it). Idempotent.
func (r *Runtime) AddMetadataHost(id string) (string, error) {
	path := r.HostsFile(id)
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("sandbox %s hosts file: %w", id, err)
	}
	if bytes.Contains(data, []byte(MetadataHostsLine)) {
		return path, nil
	}
	if len(data) > 0 && !bytes.HasSuffix(data, []byte("\n")) {
		data = append(data, '\n')
	}
	data = append(data, MetadataHostsLine+"\n"...)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return "", fmt.Errorf("sandbox %s hosts file: %w", id, err)
	}
	return path, nil
}

// RemovePod stops and removes a sandbox (`crictl stopp` then `crictl rmp`), as kubelet
// does when a pod is deleted.
func (r *Runtime) RemovePod(ctx context.Context, id string) error {
	if _, err := r.Crictl(ctx, "stopp", id); err != nil {
		return err
	}
	if _, err := r.Crictl(ctx, "rmp", id); err != nil {
		return err
	}
	r.mu.Lock()
	delete(r.sandboxes, id)
	r.mu.Unlock()
	return nil
}

// Close removes every sandbox still known, stops containerd and removes what it left
// outside its temp dir. It collects errors and always goes on to the next step.
func (r *Runtime) Close() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	if r.exited != nil && !r.hasExited() {
		// Every sandbox containerd knows, not only ours: it is a private containerd.
		if out, err := r.Crictl(ctx, "pods", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				r.mu.Lock()
				r.sandboxes[id] = true
				_, known := r.netns[id]
				r.mu.Unlock()
				if !known {
					if _, err := r.Inspect(ctx, id); err != nil && !isNotFound(err) {
						errs = append(errs, fmt.Errorf("inspect sandbox %s for its netns: %w", id, err))
					}
				}
				// NotFound: removed meanwhile (an interrupt's cleanup races the test).
				if _, err := r.Crictl(ctx, "stopp", id); err != nil && !isNotFound(err) {
					errs = append(errs, err)
				}
				if _, err := r.Crictl(ctx, "rmp", "-f", id); err != nil && !isNotFound(err) {
					errs = append(errs, err)
				}
			}
		} else {
			errs = append(errs, fmt.Errorf("list sandboxes for cleanup: %w", err))
		}
		errs = append(errs, r.stopContainerd())
	}
	errs = append(errs, r.killShims())
	errs = append(errs, r.removeLeftovers()...)
	return errors.Join(errs...)
}

func isNotFound(err error) bool {
	return strings.Contains(err.Error(), "code = NotFound")
}

func (r *Runtime) hasExited() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

func (r *Runtime) stopContainerd() error {
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.exited:
		return nil
	case <-time.After(15 * time.Second):
	}
	_ = r.cmd.Process.Kill()
	<-r.exited
	return fmt.Errorf("containerd did not stop on SIGTERM within 15s; killed")
}

// killShims kills any containerd-shim-runc-v2 still serving this runtime, told apart
// from anything else on the machine by the -address of our socket, and first the
// sandbox processes (pause) they started: killed alone, a shim leaves them running.
func (r *Runtime) killShims() error {
	type proc struct {
		pid, ppid int
		shim      bool
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	var procs []proc
	ours := map[int]bool{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := proc{pid: pid, ppid: parentPID(pid)}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil {
			args := strings.Split(string(cmdline), "\x00")
			p.shim = strings.Contains(filepath.Base(args[0]), "containerd-shim") && bytes.Contains(cmdline, []byte(r.Socket))
		}
		if p.shim {
			ours[pid] = true
		}
		procs = append(procs, p)
	}
	var errs []error
	var killed []int
	kill := func(pid int) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
			return
		}
		killed = append(killed, pid)
	}
	for _, p := range procs {
		if !p.shim && ours[p.ppid] {
			kill(p.pid)
		}
	}
	for pid := range ours {
		kill(pid)
	}
	// Wait (briefly) until they are gone, so their cgroups can be removed next.
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range killed {
		for time.Now().Before(deadline) && parentPID(pid) != 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// parentPID is pid's parent from /proc/<pid>/stat; 0 once the process is gone (or a
// zombie, which holds no cgroup).
func parentPID(pid int) int {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(fields) < 2 || fields[0] == "Z" {
		return 0
	}
	ppid, _ := strconv.Atoi(fields[1])
	return ppid
}

func (r *Runtime) removeLeftovers() []error {
	var errs []error
	r.mu.Lock()
	ids := make([]string, 0, len(r.sandboxes))
	for id := range r.sandboxes {
		ids = append(ids, id)
	}
	netns := make(map[string]string, len(r.netns))
	for id, p := range r.netns {
		netns[id] = p
	}
	r.mu.Unlock()
	// Also every sandbox containerd began to make: one whose runp was cut short (the
	// runtime killed) was never returned to us but may have left files outside.
	if entries, err := os.ReadDir(filepath.Join(r.Dir, "root", "io.containerd.grpc.v1.cri", "sandboxes")); err == nil {
		for _, e := range entries {
			if !slices.Contains(ids, e.Name()) {
				ids = append(ids, e.Name())
			}
		}
	}

	// The netns bind mounts of this runtime's own sandboxes, and nothing else: they are
	// under our state dir (netns_mounts_under_state_dir), never another run's or the
	// host containerd's /var/run/netns/cni-*. containerd removes them on rmp; this covers
	// a containerd that died or was killed (unmountUnder below catches one never
	// returned by inspectp).
	for id, p := range netns {
		if !r.isOwnNetnsPath(p) {
			errs = append(errs, fmt.Errorf("sandbox %s: netns path %q is not under this runtime's state dir; left alone", id, p))
			continue
		}
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("netns %s of sandbox %s still there after cleanup (%v)", p, id, err))
		}
	}
	// libcni's result cache for our network and for the loopback network containerd
	// adds to each of our sandboxes, the shims' sockets (containerd names them
	// sha256(<address>/<namespace>/<id>)), and runc state under the default root in
	// case a runc was ever run without our Root option.
	var stale []string
	if r.network != "" {
		stale, _ = filepath.Glob(filepath.Join("/var/lib/cni/results", r.network+"-*"))
	}
	for _, id := range ids {
		sum := sha256.Sum256([]byte(filepath.Join(r.Socket, "k8s.io", id)))
		stale = append(stale,
			filepath.Join("/var/lib/cni/results", "cni-loopback-"+id+"-lo"),
			filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:])))
	}
	for _, p := range stale {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, id := range ids {
		p := filepath.Join("/run/containerd/runc/k8s.io", id)
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	removeIfEmpty("/run/containerd/runc/k8s.io", "/run/containerd/runc", "/run/containerd/s", "/run/containerd",
		"/var/lib/cni/results", "/var/lib/cni")
	// cgroups: per-sandbox dirs, then the k8s.io parents this run created.
	for _, dir := range cgroupV1Dirs() {
		for _, id := range ids {
			p := filepath.Join(dir, "k8s.io", id)
			if err := syscall.Rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
			}
		}
	}
	for _, p := range r.k8sCgroups {
		if err := syscall.Rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
		}
	}
	// containerd's root holds overlay mounts of the sandboxes' rootfs; unmount any left.
	errs = append(errs, unmountUnder(r.Dir)...)
	return errs
}

// cgroupV1Dirs lists the mounted cgroup hierarchies (v1 controllers and the unified one).
func cgroupV1Dirs() []string {
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil
	}
	var dirs []string
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, filepath.Join("/sys/fs/cgroup", e.Name()))
		}
	}
	if len(dirs) == 0 {
		dirs = []string{"/sys/fs/cgroup"}
	}
	return dirs
}

// isOwnNetnsPath reports whether p is a sandbox netns this runtime pinned: a cni-*
// file under its own state dir, the only kind of path Close unmounts and removes.
func (r *Runtime) isOwnNetnsPath(p string) bool {
	p = filepath.Clean(p)
	return strings.HasPrefix(filepath.Base(p), "cni-") && strings.HasPrefix(p, filepath.Join(r.Dir, "state")+"/")
}

func removeIfEmpty(dirs ...string) {
	for _, d := range dirs {
		_ = syscall.Rmdir(d) // fails, as it should, when the dir is not empty or missing
	}
}

// unmountUnder detaches every mount point below dir, deepest first.
func unmountUnder(dir string) []error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return []error{fmt.Errorf("read mountinfo: %w", err)}
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			points = append(points, fields[4])
		}
	}
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", points[i], err))
		}
	}
	return errs
}

func copyExecutable(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return nil
}

func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Tail returns the last n lines of a file, for failure messages.
func Tail(path string, n int) string { return tail(path, n) }
