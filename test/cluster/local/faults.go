package local

// Faults of the node (scenario.NodeFaults, for the fault drills of
// test/cluster/scenario/faults.go): stop and start containerd and the kubelet, kill a
// container's process, and a reboot in two halves (Shutdown, Boot). All of it stays in
// this run's node netns and temp dir: processes are this run's (recorded at start,
// shims found by this run's socket), the rules and addresses flushed are the node
// netns's, the files removed are under the run's dir or state records naming the
// run's network.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/containerd"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
)

// stopGrace is how long a node process gets after SIGTERM before SIGKILL.
const stopGrace = 15 * time.Second

// proc is the current process of a node component (the latest start of name).
func (c *Cluster) proc(name string) *containerd.Proc {
	for _, p := range c.procs {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// respawn starts component name again with the arguments of its first start, in place
// of its exited process (so teardown keeps its order), with a log file of its own.
func (c *Cluster) respawn(name string) (*containerd.Proc, error) {
	for i, old := range c.procs {
		if old.Name != name {
			continue
		}
		if old.Running() {
			return nil, fmt.Errorf("%s is still running (pid %d)", name, old.Cmd.Process.Pid)
		}
		c.starts[name]++
		logPath := filepath.Join(c.Dir, "logs", fmt.Sprintf("%s.%d.log", name, c.starts[name]))
		// Args: nsenter --net=PATH BIN ARGS...
		p, err := containerd.StartProc(c.netnsPath, logPath, name, old.Cmd.Args[2], old.Cmd.Args[3:]...)
		if err != nil {
			return nil, err
		}
		c.procs[i] = p
		return p, nil
	}
	return nil, fmt.Errorf("no %s was started", name)
}

func (c *Cluster) checkNode(node string) error {
	if node != nodeName {
		return fmt.Errorf("no node %q", node)
	}
	return nil
}

func (c *Cluster) stopComponent(name string) error {
	p := c.proc(name)
	if p == nil {
		return fmt.Errorf("no %s was started", name)
	}
	if !p.Running() {
		return fmt.Errorf("%s is not running", name)
	}
	if err := p.Stop(stopGrace); err != nil {
		return err
	}
	c.logf("%s (pid %d) stopped", name, p.Cmd.Process.Pid)
	return nil
}

// StopContainerd stops containerd (SIGTERM). Its shims, and so the pods, keep running,
// as when systemd restarts containerd on a node.
func (c *Cluster) StopContainerd(_ context.Context, node string) error {
	if err := c.checkNode(node); err != nil {
		return err
	}
	return c.stopComponent("containerd")
}

// StartContainerd starts containerd again (same config, root and state) and waits
// until its CRI answers.
func (c *Cluster) StartContainerd(ctx context.Context, node string) error {
	if err := c.checkNode(node); err != nil {
		return err
	}
	p, err := c.respawn("containerd")
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 60*time.Second, func() error {
		_, err := c.crictl(ctx, "info")
		return err
	})
}

// StopKubelet stops the kubelet (SIGTERM); the pods keep running.
func (c *Cluster) StopKubelet(_ context.Context, node string) error {
	if err := c.checkNode(node); err != nil {
		return err
	}
	return c.stopComponent("kubelet")
}

// StartKubelet starts the kubelet again and waits until its healthz answers.
func (c *Cluster) StartKubelet(ctx context.Context, node string) error {
	if err := c.checkNode(node); err != nil {
		return err
	}
	p, err := c.respawn("kubelet")
	if err != nil {
		return err
	}
	client := simnode.HTTPClientIn(c.netnsPath, 2*time.Second)
	return waitFor(ctx, p, 90*time.Second, func() error {
		resp, err := client.Get("http://127.0.0.1:10248/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("kubelet /healthz: %s", resp.Status)
		}
		return nil
	})
}

// KillContainer sends SIGKILL to the main process of container in pod ns/pod on node,
// found through the CRI (the pod's sandbox, then the running container of that name,
// then its pid), and returns that pid and its command line.
func (c *Cluster) KillContainer(ctx context.Context, node, ns, pod, container string) (int, string, error) {
	if err := c.checkNode(node); err != nil {
		return 0, "", err
	}
	out, err := c.crictl(ctx, "pods", "--namespace", ns, "--name", pod, "--state", "ready", "-q")
	if err != nil {
		return 0, "", err
	}
	sandboxes := strings.Fields(out)
	if len(sandboxes) != 1 {
		return 0, "", fmt.Errorf("pod %s/%s: %d ready sandboxes (%v), want 1", ns, pod, len(sandboxes), sandboxes)
	}
	out, err = c.crictl(ctx, "ps", "--pod", sandboxes[0], "--name", "^"+container+"$", "--state", "running", "-q")
	if err != nil {
		return 0, "", err
	}
	ids := strings.Fields(out)
	if len(ids) != 1 {
		return 0, "", fmt.Errorf("pod %s/%s: %d running containers named %s, want 1", ns, pod, len(ids), container)
	}
	out, err = c.crictl(ctx, "inspect", "-o", "go-template", "--template", "{{.info.pid}}", ids[0])
	if err != nil {
		return 0, "", err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid <= 1 {
		return 0, "", fmt.Errorf("container %s: pid %q: %v", ids[0], out, err)
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return 0, "", fmt.Errorf("container %s: pid %d: %w", ids[0], pid, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return 0, "", fmt.Errorf("kill %d (container %s): %w", pid, ids[0], err)
	}
	cmd := strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))
	c.logf("SIGKILL to pid %d (%s, container %s of %s/%s)", pid, cmd, container, ns, pod)
	return pid, cmd, nil
}

// Shutdown is the first half of a reboot: the node's processes stop (the kubelet,
// kube-proxy, containerd, then its shims with every pod process, SIGKILL), and what a
// reboot empties is emptied: containerd's state and runc's root (tmpfs /run on a node),
// the sandboxes' netns under it, every mount under the runtime's and the kubelet's dirs,
// the plugin's state records of this run (/run/metaconceal), and in the node netns every
// iptables rule and chain (nft and legacy, IPv4 and IPv6), the proxy's address on lo and
// every link the pods' networking made. What a node keeps on disk stays: containerd's
// root (images, the sandboxes' metadata), the kubelet's dir, the CNI conf and bin dirs.
// The control plane and the metadata server, which are not the node's, keep running.
func (c *Cluster) Shutdown(ctx context.Context, node string) error {
	if err := c.checkNode(node); err != nil {
		return err
	}
	// Remember every id for the teardown: after the reboot the runtime no longer
	// knows the old sandboxes' tasks.
	if out, err := c.crictl(ctx, "ps", "-a", "-q"); err == nil {
		c.staleIDs = append(c.staleIDs, strings.Fields(out)...)
	}
	if out, err := c.crictl(ctx, "pods", "-q"); err == nil {
		c.staleIDs = append(c.staleIDs, strings.Fields(out)...)
	}
	c.staleIDs = append(c.staleIDs, c.containerIDsOnDisk()...)
	for _, name := range []string{"kubelet", "kube-proxy", "containerd"} {
		if p := c.proc(name); p != nil && p.Running() {
			if err := c.stopComponent(name); err != nil {
				return fmt.Errorf("shutdown: %w", err)
			}
		}
	}
	if err := containerd.KillShims(c.socket); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	var errs []error
	for _, d := range []string{filepath.Join(c.Dir, "containerd"), filepath.Join(c.Dir, "kubelet")} {
		errs = append(errs, containerd.UnmountUnder(d)...)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	for _, d := range []string{filepath.Join(c.Dir, "containerd", "state"), filepath.Join(c.Dir, "containerd", "runc")} {
		if err := emptyDir(d); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
	}
	n, err := c.removeRecords()
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	// The readiness gate's marker that it opened since boot: a reboot empties /run.
	if _, err := nodegate.RemoveMarker(stateDir); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := c.resetNodeNetwork(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	c.logf("node shut down: processes stopped, runtime state, %d state records, rules, addresses and pod links gone", n)
	return nil
}

// Boot is the second half of a reboot: containerd, the kubelet (which registers the
// node when its object is gone, with Config.RegisterWithTaints) and kube-proxy start
// again, in that order, each waited for.
func (c *Cluster) Boot(ctx context.Context, node string) error {
	if err := c.StartContainerd(ctx, node); err != nil {
		return fmt.Errorf("boot: containerd: %w", err)
	}
	if err := c.StartKubelet(ctx, node); err != nil {
		return fmt.Errorf("boot: kubelet: %w", err)
	}
	// kube-proxy reads the node's addresses from its object: after the kubelet's.
	if err := waitFor(ctx, c.proc("kubelet"), 60*time.Second, func() error {
		_, err := c.Kubectl(ctx, nil, "get", "node", nodeName)
		return err
	}); err != nil {
		return fmt.Errorf("boot: node object: %w", err)
	}
	p, err := c.respawn("kube-proxy")
	if err != nil {
		return fmt.Errorf("boot: %w", err)
	}
	if err := waitFor(ctx, p, 60*time.Second, c.dialCheck("127.0.0.1:10256")); err != nil {
		return fmt.Errorf("boot: kube-proxy: %w", err)
	}
	c.logf("node booted: containerd, kubelet, kube-proxy running")
	return nil
}

// emptyDir removes what is in dir (never through a mount: the caller unmounted first).
func emptyDir(dir string) error {
	if left := containerd.MountsUnder(dir); len(left) > 0 {
		return fmt.Errorf("%s: still mounted: %s", dir, strings.Join(left, " "))
	}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// removeRecords removes the state records of this run's pods (those naming its
// network) and returns how many.
func (c *Cluster) removeRecords() (int, error) {
	entries, err := os.ReadDir(stateDir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		p := filepath.Join(stateDir, e.Name())
		data, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(data), `"`+c.network+`"`) {
			continue
		}
		if err := os.Remove(p); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// resetNodeNetwork empties, inside the node netns only, what a reboot empties: every
// iptables table of both backends and families (flushed, user chains deleted), the
// proxy's 169.254.169.252 on lo, and every link but lo and the node's own (the pod
// bridge, veths left behind). The node's own addresses (the node IP, the metadata
// server's) are its boot configuration and stay.
func (c *Cluster) resetNodeNetwork(ctx context.Context) error {
	in := func(args ...string) (string, error) {
		return simnode.Run(ctx, "nsenter", append([]string{"--net=" + c.netnsPath}, args...)...)
	}
	for _, tool := range []string{"iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy"} {
		save, err := in(tool + "-save")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(save, "\n") {
			table, ok := strings.CutPrefix(line, "*")
			if !ok {
				continue
			}
			for _, op := range []string{"-F", "-X"} {
				if _, err := in(tool, "-w", "-t", table, op); err != nil {
					return err
				}
			}
		}
	}
	addrs, err := in("ip", "-o", "addr", "show", "dev", "lo")
	if err != nil {
		return err
	}
	if strings.Contains(addrs, " 169.254.169.252/32 ") {
		if _, err := in("ip", "addr", "del", "169.254.169.252/32", "dev", "lo"); err != nil {
			return err
		}
	}
	links, err := in("ip", "-o", "link", "show")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(links, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name == "lo" || name == nodeLink {
			continue
		}
		if _, err := in("ip", "link", "del", name); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
			return err
		}
	}
	return nil
}
