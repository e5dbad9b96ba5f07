// Package kind is the cluster e2e's second provider: a kind cluster (Docker hosts;
// `make kind-e2e`). It runs the same scenario list as the local provider
// (test/cluster/scenario) with conf/deploy applied unchanged: the images are the same
// docker-archive tars, loaded into the nodes with `kind load image-archive`, and the
// project's fake GCE metadata server runs on every node as a hostNetwork pod of its own
// test image (test/kind/fake-metadata.yaml), on an address it puts on the node
// container's lo.
//
// kind cannot run where this project is built (no Docker engine, no registry): this
// package is compiled and vetted there, and run only on Docker hosts.
package kind

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/metaconceal/metaconceal/test/cluster/images"
	"github.com/metaconceal/metaconceal/test/cluster/scenario"
)

// Config says where the inputs are.
type Config struct {
	RepoRoot string
	Images   images.Archives
	// Name of the kind cluster (default metaconceal-e2e); KEEP_CLUSTER=1 in the
	// environment keeps it after the run.
	Name string
	Log  io.Writer
}

// Cluster is a kind cluster; it implements scenario.Cluster.
type Cluster struct {
	cfg     Config
	created bool
	nodes   []string
}

// Up creates the cluster, loads the images and starts the fake metadata server.
func Up(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if cfg.Name == "" {
		cfg.Name = "metaconceal-e2e"
	}
	c = &Cluster{cfg: cfg}
	for _, tool := range []string{"docker", "kind", "kubectl"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("kind provider needs %s on PATH (it runs only where Docker is available): %w", tool, err)
		}
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
			c = nil
		}
	}()
	if _, err := c.run(ctx, nil, "kind", "create", "cluster", "--name", cfg.Name,
		"--config", filepath.Join(cfg.RepoRoot, "test/kind/kind-config.yaml"), "--wait", "180s"); err != nil {
		return c, err
	}
	c.created = true
	out, err := c.run(ctx, nil, "kind", "get", "nodes", "--name", cfg.Name)
	if err != nil {
		return c, err
	}
	c.nodes = strings.Fields(string(out))
	for _, a := range cfg.Images.All() {
		if _, err := c.run(ctx, nil, "kind", "load", "image-archive", a, "--name", cfg.Name); err != nil {
			return c, err
		}
	}
	manifest, err := os.ReadFile(filepath.Join(cfg.RepoRoot, "test/kind/fake-metadata.yaml"))
	if err != nil {
		return c, err
	}
	manifest = bytes.ReplaceAll(manifest, []byte("FAKE_GCE_IMAGE"), []byte(images.FakeGCERef))
	if _, err := c.Kubectl(ctx, manifest, "apply", "-f", "-"); err != nil {
		return c, err
	}
	if _, err := c.Kubectl(ctx, nil, "-n", "metaconceal-fake-gce", "rollout", "status", "daemonset/fake-gce-metadata", "--timeout=180s"); err != nil {
		return c, err
	}
	return c, nil
}

func (c *Cluster) run(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Kubectl runs kubectl with the cluster's context.
func (c *Cluster) Kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	return c.run(ctx, stdin, "kubectl", append([]string{"--context", "kind-" + c.cfg.Name}, args...)...)
}

// Nodes lists the kind node containers.
func (c *Cluster) Nodes() []string { return c.nodes }

// NodeExec runs a command in a node container.
func (c *Cluster) NodeExec(ctx context.Context, node string, args ...string) ([]byte, error) {
	return c.run(ctx, nil, "docker", append([]string{"exec", node}, args...)...)
}

// NodeReadFile reads a file in a node container.
func (c *Cluster) NodeReadFile(ctx context.Context, node, path string) ([]byte, error) {
	return c.NodeExec(ctx, node, "cat", path)
}

// Paths are conf/deploy's defaults, as on a kind node.
func (c *Cluster) Paths() scenario.NodePaths {
	return scenario.NodePaths{CNIConfDir: "/etc/cni/net.d", CNIBinDir: "/opt/cni/bin", StateDir: "/run/metaconceal"}
}

// DeployDir is conf/deploy itself: the loaded image carries its name.
func (c *Cluster) DeployDir() string { return filepath.Join(c.cfg.RepoRoot, "conf/deploy") }

// UninstallDir is conf/deploy/uninstall.
func (c *Cluster) UninstallDir() string {
	return filepath.Join(c.cfg.RepoRoot, "conf/deploy/uninstall")
}

// Images are the loaded images.
func (c *Cluster) Images() scenario.Images {
	return scenario.Images{Metaconceal: images.MetaconcealRef, Update: images.UpdateRef, Probe: images.ProbeRef}
}

// Close deletes the cluster (unless KEEP_CLUSTER=1).
func (c *Cluster) Close() error {
	if !c.created || os.Getenv("KEEP_CLUSTER") == "1" {
		return nil
	}
	_, err := c.run(context.Background(), nil, "kind", "delete", "cluster", "--name", c.cfg.Name)
	return err
}
