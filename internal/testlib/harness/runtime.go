// Package harness runs a real container runtime on a simulated node for the e2e tests:
// containerd (Debian's 1.6) + runc started inside the node's network namespace, with
// every directory it owns under a temp dir, a locally built pause image, and crictl
// pointed at its socket. Close stops every sandbox and removes what containerd leaves
// outside its own directories (its sandboxes' netns bind mounts, CNI cache, runc state,
// cgroups).
//
// StartNode (node.go) builds the whole node the e2e tests run on: the runtime with the
// conflist from conf/, the fake GCE metadata server and metaconceal-proxy with its host
// guard; probe.go holds what a test runs from inside a pod (curl, DNS, UDP, ICMP; NTP,
// ALTS and refusals are simnode's probes) and the witnesses that count what reaches
// the node. containerd's configuration, processes and cleanup are shared with the
// cluster e2e (internal/testlib/containerd).
package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/containerd"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
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

	proc *containerd.Proc

	mu        sync.Mutex
	sandboxes map[string]bool   // every sandbox id created through this runtime
	netns     map[string]string // sandbox id -> its netns bind mount, from inspectp

	lease *containerd.Lease // this runtime's claim on what test runtimes share
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
	ctrdCfg := containerd.Config(containerd.ConfigParams{
		Dir: cfg.Dir, Socket: r.Socket, PauseImage: PauseImageRef, CNIBinDir: r.CNIBinDir, CNIConfDir: confDir,
	})
	if err := os.WriteFile(configPath, []byte(ctrdCfg), 0o644); err != nil {
		return nil, fmt.Errorf("write containerd config: %w", err)
	}
	if err := os.WriteFile(r.crictlCfg, []byte(containerd.CrictlConfig(r.Socket)), 0o644); err != nil {
		return nil, fmt.Errorf("write crictl config: %w", err)
	}
	var err error
	if r.lease, err = containerd.AcquireLease(r.Socket); err != nil {
		return nil, err
	}
	if r.proc, err = containerd.StartProc(cfg.Node.Path, r.LogPath, "containerd", "containerd", "--config", configPath); err != nil {
		return nil, errors.Join(err, r.Close())
	}

	if err := r.waitReady(ctx, 60*time.Second); err != nil {
		return nil, errors.Join(err, r.Close())
	}
	if out, err := r.ctr(ctx, "images", "import", cfg.PauseArchive); err != nil {
		return nil, errors.Join(fmt.Errorf("import pause image: %w (%s)", err, out), r.Close())
	}
	return r, nil
}

func (r *Runtime) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-r.proc.Exited():
			return fmt.Errorf("during start: %w", r.proc.ExitedErr(30))
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
	return fmt.Errorf("containerd CRI not ready after %s: %w; log:\n%s", timeout, lastErr, containerd.Tail(r.LogPath, 30))
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
	// DNSServers, when set, are the nameservers of the pod's resolv.conf (as kubelet
	// writes for dnsPolicy: Default on a GCE node: the metadata address).
	DNSServers []string
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
	if len(spec.DNSServers) > 0 {
		sandbox["dns_config"] = map[string]any{"servers": spec.DNSServers}
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
	IPs       []string // IP and the additional ones (the IPv6 address of a dual-stack pod)
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
				IP            string `json:"ip"`
				AdditionalIPs []struct {
					IP string `json:"ip"`
				} `json:"additionalIps"`
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
	if sb.IP != "" {
		sb.IPs = append(sb.IPs, sb.IP)
	}
	for _, a := range doc.Status.Network.AdditionalIPs {
		sb.IPs = append(sb.IPs, a.IP)
	}
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

// ResolvConf is the resolv.conf containerd's CRI wrote for a sandbox (from its
// dns_config), which it bind-mounts as /etc/resolv.conf into each of the pod's containers.
func (r *Runtime) ResolvConf(id string) string {
	return filepath.Join(r.Dir, "root", "io.containerd.grpc.v1.cri", "sandboxes", id, "resolv.conf")
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

// Known reports whether the sandbox was made through this runtime and not yet
// removed with RemovePod.
func (r *Runtime) Known(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sandboxes[id]
}

// Close removes every sandbox still known, stops containerd and removes what it left
// outside its temp dir. It collects errors and always goes on to the next step.
func (r *Runtime) Close() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	if r.proc != nil && r.proc.Running() {
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
		errs = append(errs, r.proc.Stop(15*time.Second))
	}
	errs = append(errs, containerd.KillShims(r.Socket))
	errs = append(errs, r.removeLeftovers()...)
	return errors.Join(errs...)
}

func isNotFound(err error) bool {
	return strings.Contains(err.Error(), "code = NotFound")
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
	errs = append(errs, containerd.RemoveOutside(r.Socket, r.network, ids)...)
	// containerd's root holds overlay mounts of the sandboxes' rootfs; unmount any left.
	errs = append(errs, containerd.UnmountUnder(r.Dir)...)
	// Last: the shared k8s.io parents and directories go only with the last runtime.
	return append(errs, r.lease.Release()...)
}

// isOwnNetnsPath reports whether p is a sandbox netns this runtime pinned: a cni-*
// file under its own state dir, the only kind of path Close unmounts and removes.
func (r *Runtime) isOwnNetnsPath(p string) bool {
	p = filepath.Clean(p)
	return strings.HasPrefix(filepath.Base(p), "cni-") && strings.HasPrefix(p, filepath.Join(r.Dir, "state")+"/")
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

// Tail returns the last n lines of a file, for failure messages.
func Tail(path string, n int) string { return containerd.Tail(path, n) }
