// Package simnode builds a simulated GCE node for tests, benchmarks and the demo: a
// network namespace of its own with the metadata and proxy addresses on its lo, and
// pod network namespaces beside it. Nothing here touches the machine's own netns,
// routes or iptables, and every namespace is removed by Close, also when a test fails.
package simnode

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/metaconceal/metaconceal/pkg/gce"
)

// Addresses every simulated node carries on its lo, as on a GKE node (pkg/gce).
var (
	MetadataIP = gce.MetadataIPv4.String()
	ProxyIP    = gce.ProxyIPv4.String()
)

// NetnsDir is where `ip netns` keeps named namespaces.
const NetnsDir = "/var/run/netns"

// Node is a simulated node: a named network namespace.
type Node struct {
	Name string // the `ip netns` name
	Path string // bind-mounted netns file, for ns.GetNS / CNI_NETNS

	mu   sync.Mutex
	pods []string // pod netns names to delete on Close
}

// RandomSuffix returns a short random hex string to keep parallel runs apart.
func RandomSuffix() string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("simnode: crypto/rand failed: %v", err))
	}
	return hex.EncodeToString(b[:])
}

// New creates a node netns named prefix-<random>, brings its lo up and puts the
// metadata address and the proxy address (and extraAddrs, CIDR form) on lo. On error
// everything created so far is removed.
func New(prefix string, extraAddrs ...string) (*Node, error) {
	name := prefix + "-" + RandomSuffix()
	if _, err := Run(context.Background(), "ip", "netns", "add", name); err != nil {
		return nil, err
	}
	n := &Node{Name: name, Path: filepath.Join(NetnsDir, name)}
	steps := [][]string{{"ip", "-n", name, "link", "set", "lo", "up"},
		{"ip", "-n", name, "addr", "add", MetadataIP + "/32", "dev", "lo"},
		// Scope host, as GKE puts it (and the host guard when it is missing): the node
		// never picks it as a source address.
		{"ip", "-n", name, "addr", "add", ProxyIP + "/32", "dev", "lo", "scope", "host"}}
	for _, a := range extraAddrs {
		steps = append(steps, []string{"ip", "-n", name, "addr", "add", a, "dev", "lo"})
	}
	for _, s := range steps {
		if _, err := Run(context.Background(), s[0], s[1:]...); err != nil {
			return nil, errors.Join(err, n.Close())
		}
	}
	return n, nil
}

// NewPodNS creates an empty pod netns (lo up, so that locally generated REJECTs are
// delivered) that Close will delete; it returns its name and path.
func (n *Node) NewPodNS(prefix string) (name, path string, err error) {
	name = prefix + "-" + RandomSuffix()
	if _, err := Run(context.Background(), "ip", "netns", "add", name); err != nil {
		return "", "", err
	}
	n.mu.Lock()
	n.pods = append(n.pods, name)
	n.mu.Unlock()
	if _, err := Run(context.Background(), "ip", "-n", name, "link", "set", "lo", "up"); err != nil {
		return "", "", err
	}
	return name, filepath.Join(NetnsDir, name), nil
}

// Command returns a command that runs inside the node netns.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Exec runs a command inside the node netns and returns its stdout; the error carries
// stderr.
func (n *Node) Exec(ctx context.Context, name string, args ...string) (string, error) {
	return Run(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Close deletes the pod namespaces created through this node, then the node netns.
// Deleting a netns also deletes the veths and iptables rules inside it.
func (n *Node) Close() error {
	n.mu.Lock()
	pods := n.pods
	n.pods = nil
	n.mu.Unlock()
	var errs []error
	for _, p := range pods {
		errs = append(errs, DeleteNetns(p))
	}
	errs = append(errs, DeleteNetns(n.Name))
	return errors.Join(errs...)
}

// DeleteNetns removes a named netns; one that does not exist is not an error.
func DeleteNetns(name string) error {
	if _, err := os.Stat(filepath.Join(NetnsDir, name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, err := Run(context.Background(), "ip", "netns", "delete", name)
	return err
}

// Run runs a command and returns its stdout; a failure names the command and carries
// its stderr.
func Run(ctx context.Context, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
