// Package cri reads pod sandboxes from the container runtime over its CRI socket (CRI
// v1): which are ready, their pod, IPs and network namespace. The node agent's repair
// loop (pkg/repair) is its user.
package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Sandbox is what the node agent needs to know of one pod sandbox.
type Sandbox struct {
	ID                   string
	Namespace, Name, UID string // from the sandbox metadata (kubelet's pod)
	Ready                bool
	HostNetwork          bool
	Netns                string   // the sandbox's network namespace path; empty for hostNetwork
	IPs                  []string // the pod's IPs as the runtime reports them
	CreatedAt            time.Time
}

func (s Sandbox) String() string {
	return s.Namespace + "/" + s.Name + " (sandbox " + ShortID(s.ID) + ")"
}

// ShortID is the first 13 characters of a sandbox or container id, for logs.
func ShortID(id string) string {
	if len(id) > 13 {
		return id[:13]
	}
	return id
}

// Client lists pod sandboxes through the container runtime's CRI socket.
type Client struct {
	conn    *grpc.ClientConn
	rt      runtimeapi.RuntimeServiceClient
	timeout time.Duration
}

// Dial connects to the CRI socket at endpoint (a path, or unix:///path) and checks
// that it answers CRI v1.
func Dial(ctx context.Context, endpoint string, timeout time.Duration) (*Client, error) {
	path := strings.TrimPrefix(strings.TrimPrefix(endpoint, "unix://"), "unix:")
	if path == "" || !strings.HasPrefix(path, "/") {
		return nil, fmt.Errorf("cri: CRI endpoint %q: want an absolute socket path", endpoint)
	}
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("cri: CRI endpoint %s: %w", path, err)
	}
	c := &Client{conn: conn, rt: runtimeapi.NewRuntimeServiceClient(conn), timeout: timeout}
	vctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := c.rt.Version(vctx, &runtimeapi.VersionRequest{}); err != nil {
		return nil, errors.Join(fmt.Errorf("cri: CRI v1 at %s does not answer: %w", path, err), conn.Close())
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// ReadySandboxes lists the sandboxes in state READY with their status.
func (c *Client) ReadySandboxes(ctx context.Context) ([]Sandbox, error) {
	lctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.rt.ListPodSandbox(lctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY},
	}})
	if err != nil {
		return nil, fmt.Errorf("cri: list pod sandboxes: %w", err)
	}
	var out []Sandbox
	var errs []error
	for _, item := range resp.GetItems() {
		sb, found, err := c.Sandbox(ctx, item.GetId())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if found && sb.Ready {
			out = append(out, sb)
		}
	}
	return out, errors.Join(errs...)
}

// Sandbox reads one sandbox's status; found is false when the runtime no longer has it.
func (c *Client) Sandbox(ctx context.Context, id string) (sb Sandbox, found bool, err error) {
	sctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.rt.PodSandboxStatus(sctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	if status.Code(err) == codes.NotFound {
		return Sandbox{}, false, nil
	}
	if err != nil {
		return Sandbox{}, false, fmt.Errorf("cri: status of sandbox %s: %w", ShortID(id), err)
	}
	sb, err = FromStatus(resp.GetStatus(), resp.GetInfo())
	return sb, true, err
}

// FromStatus turns a CRI sandbox status (and the runtime's verbose info) into a
// Sandbox. The netns path comes from the verbose info: containerd's runtimeSpec (the
// path of the network namespace) or its netNamespacePath.
func FromStatus(st *runtimeapi.PodSandboxStatus, info map[string]string) (Sandbox, error) {
	if st == nil {
		return Sandbox{}, errors.New("cri: empty sandbox status")
	}
	md := st.GetMetadata()
	sb := Sandbox{
		ID: st.GetId(), Namespace: md.GetNamespace(), Name: md.GetName(), UID: md.GetUid(),
		Ready:       st.GetState() == runtimeapi.PodSandboxState_SANDBOX_READY,
		HostNetwork: st.GetLinux().GetNamespaces().GetOptions().GetNetwork() == runtimeapi.NamespaceMode_NODE,
		CreatedAt:   time.Unix(0, st.GetCreatedAt()),
	}
	if ip := st.GetNetwork().GetIp(); ip != "" {
		sb.IPs = append(sb.IPs, ip)
	}
	for _, ip := range st.GetNetwork().GetAdditionalIps() {
		if ip.GetIp() != "" {
			sb.IPs = append(sb.IPs, ip.GetIp())
		}
	}
	if sb.HostNetwork {
		return sb, nil
	}
	path, err := netnsFromInfo(info)
	if err != nil {
		return sb, fmt.Errorf("cri: sandbox %s: %w", sb, err)
	}
	sb.Netns = path
	return sb, nil
}

// netnsFromInfo reads the network namespace path from the verbose "info" JSON.
func netnsFromInfo(info map[string]string) (string, error) {
	raw, ok := info["info"]
	if !ok {
		return "", errors.New("the runtime's verbose status has no info (is it containerd?)")
	}
	var doc struct {
		NetNSPath   string `json:"netNamespacePath"`
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	if err := json.Unmarshal([]byte(raw), &doc); err != nil {
		return "", fmt.Errorf("decode the runtime's verbose info: %w", err)
	}
	if doc.NetNSPath != "" {
		return doc.NetNSPath, nil
	}
	for _, ns := range doc.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" && ns.Path != "" {
			return ns.Path, nil
		}
	}
	return "", errors.New("the runtime's verbose info names no network namespace path")
}
