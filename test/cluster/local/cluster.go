// Package local is the cluster e2e's local provider: a real one-node Kubernetes
// cluster on this machine, all real processes (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, kubelet built from pinned modules in
// test/cluster/tools; Debian's containerd and runc), every one of them in a network
// namespace of its own (the "node"), with the project's fake GCE metadata server on
// 169.254.169.254 inside it. Nothing touches the machine's own netns, routes or
// iptables; certificates, kubeconfigs and every component's state live in a temp dir.
//
// Close tears everything down (also after a failed Up, and the runner calls it on
// Ctrl-C): the pods through the CRI (so the CNI DEL runs), the processes, the mounts,
// what containerd and the kubelet write outside the temp dir (tracked, never a
// blanket delete: another containerd may share those directories), the node netns
// with its rules, the temp dir, and the kernel settings the kubelet changes.
package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/containerd"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/test/cluster/images"
	"github.com/metaconceal/metaconceal/test/cluster/scenario"
)

// Node addressing inside the node netns (private to it, so fixed values are safe).
const (
	nodeName    = "metaconceal-node"
	nodeIP      = "10.213.0.2"
	nodeLink    = "mcnode0" // a bridge without ports, holding the node IP
	podSubnet   = "10.214.0.0/24"
	podBridge   = "mcpod0"
	serviceCIDR = "10.96.0.0/16"
	serviceIP   = "10.96.0.1"
	metadataIP  = "169.254.169.254"
)

// Fixed paths outside the temp dir.
const (
	lockPath         = "/run/lock/metaconceal-cluster-e2e.lock"
	stateDir         = "/run/metaconceal" // the plugin's default state dir (conf/deploy mounts it)
	devicePluginsDir = "/var/lib/kubelet/device-plugins"
	containerLogsDir = "/var/log/containers"
)

// Config says where the inputs are.
type Config struct {
	RepoRoot      string // the repository (conf/deploy, test/cluster/deploy)
	BinDir        string // bin/: CNI plugins, crictl, fake-gce-metadata
	ClusterBinDir string // bin/cluster: etcd, kube-*, kubectl
	Images        images.Archives
	PauseArchive  string // docker-archive of the sandbox image (harness.PauseImageRef)
	PauseRef      string
	// RegisterWithTaints is passed to the kubelet (--register-with-taints), for
	// scenarios of a readiness gate.
	RegisterWithTaints []string
	// CNI is the node's main CNI datapath: "bridge" (pods on a Linux bridge, the
	// default) or "ptp" (routed: a veth per pod with a /32 route on the node, as GKE's
	// classic datapath).
	CNI string
	Log io.Writer
}

// CNIs are the main CNI datapaths the local provider runs.
var CNIs = []string{"bridge", "ptp"}

// Cluster is a running local cluster; it implements scenario.Cluster.
type Cluster struct {
	cfg        Config
	Dir        string
	netns      string
	netnsPath  string
	kubeconfig string
	socket     string
	network    string
	nodeRoot   string // the node's "/" for CNI bin and conf dirs (under Dir)
	deployDir  string
	uninstall  string

	lock   *os.File
	procs  []*containerd.Proc // in start order; a restart replaces its entry (faults.go)
	starts map[string]int     // restarts per component, for their log names

	// What Close must remove outside Dir.
	createdDirs  []string          // created by this run; removed when empty
	lease        *containerd.Lease // this run's claim on what test runtimes share
	kernelBefore map[string]string // /proc/sys values the kubelet may change
	staleIDs     []string          // sandbox and container ids from before a Shutdown
}

// Up starts the cluster. On error everything started is torn down.
func Up(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if cfg.CNI == "" {
		cfg.CNI = "bridge"
	}
	if !slices.Contains(CNIs, cfg.CNI) {
		return nil, fmt.Errorf("local cluster: CNI %q: want one of %s", cfg.CNI, strings.Join(CNIs, ", "))
	}
	c = &Cluster{cfg: cfg, network: "mc-e2e-" + simnode.RandomSuffix(), starts: map[string]int{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
			c = nil
		}
	}()
	if err := c.takeLock(ctx); err != nil {
		return c, err
	}
	c.Dir, err = os.MkdirTemp("", "metaconceal-cluster-")
	if err != nil {
		return c, err
	}
	c.logf("run dir %s", c.Dir)
	c.kernelBefore = readKernel()
	for _, d := range []string{"logs", "pki", "etcd", "containerd", "kubelet", "pod-logs", "node/opt/cni/bin", "node/etc/cni/net.d", "node/var/lib/cni/networks"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return c, err
		}
	}
	c.nodeRoot = filepath.Join(c.Dir, "node")
	c.socket = filepath.Join(c.Dir, "containerd", "containerd.sock")
	c.kubeconfig = filepath.Join(c.Dir, "pki", "admin.conf")
	for _, d := range []string{stateDir, devicePluginsDir, containerLogsDir} {
		if err := c.mkdirTracked(d); err != nil {
			return c, err
		}
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"node netns", c.makeNode},
		{"fake GCE metadata server", c.startFakeGCE},
		{"certificates", c.makePKI},
		{"main CNI", c.writeMainCNI},
		{"etcd", c.startEtcd},
		{"containerd and images", c.startContainerd},
		{"kube-apiserver", c.startAPIServer},
		{"controller-manager and scheduler", c.startControllers},
		{"kubelet", c.startKubelet},
		{"node Ready", c.waitNodeReady},
		// After the Node exists: kube-proxy reads its addresses from it.
		{"kube-proxy", c.startKubeProxy},
		{"deploy overlays", c.writeOverlays},
	}
	for _, s := range steps {
		start := time.Now()
		if err := s.fn(ctx); err != nil {
			return c, fmt.Errorf("cluster up: %s: %w", s.name, err)
		}
		c.logf("%s: %.1fs", s.name, time.Since(start).Seconds())
	}
	return c, nil
}

func (c *Cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.cfg.Log, "    "+format+"\n", args...)
}

// takeLock serializes cluster-e2e runs on this machine: they share /run/metaconceal
// and the kubelet's hard-coded device-plugins dir. A second run waits (up to 20
// minutes, or until interrupted) for the first to finish.
func (c *Cluster) takeLock(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(lockPath), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Minute)
	for said := false; ; said = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return fmt.Errorf("another cluster-e2e holds %s: %w", lockPath, err)
		}
		if !said {
			c.logf("another cluster-e2e runs on this machine (%s): waiting for it", lockPath)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	c.lock = f
	return nil
}

// mkdirTracked creates dir (and parents) and remembers each one it created.
func (c *Cluster) mkdirTracked(dir string) error {
	var missing []string
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// Deepest first, so Close can remove them in this order.
	c.createdDirs = append(c.createdDirs, missing...)
	return nil
}

func (c *Cluster) makeNode(ctx context.Context) error {
	c.netns = "mc-cluster-" + simnode.RandomSuffix()
	if _, err := simnode.Run(ctx, "ip", "netns", "add", c.netns); err != nil {
		return err
	}
	c.netnsPath = filepath.Join(simnode.NetnsDir, c.netns)
	for _, s := range [][]string{
		{"link", "set", "lo", "up"},
		// The metadata server's address; the proxy adds its own (169.254.169.252)
		// with its host guard, as on a GKE node.
		{"addr", "add", metadataIP + "/32", "dev", "lo"},
		// The node IP on a bridge without ports: the kubelet refuses a loopback one.
		{"link", "add", nodeLink, "type", "bridge"},
		{"addr", "add", nodeIP + "/24", "dev", nodeLink},
		{"link", "set", nodeLink, "up"},
	} {
		if _, err := simnode.Run(ctx, "ip", append([]string{"-n", c.netns}, s...)...); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cluster) start(name, bin string, args ...string) (*containerd.Proc, error) {
	p, err := containerd.StartProc(c.netnsPath, filepath.Join(c.Dir, "logs", name+".log"), name, bin, args...)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	return p, nil
}

// waitFor polls check until it returns nil, p exits, or timeout.
func waitFor(ctx context.Context, p *containerd.Proc, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if p != nil && !p.Running() {
			return p.ExitedErr(25)
		}
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			if p != nil {
				return fmt.Errorf("not ready after %s: %w; last lines of %s:\n%s", timeout, last, p.LogPath, containerd.Tail(p.LogPath, 15))
			}
			return fmt.Errorf("not ready after %s: %w", timeout, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (c *Cluster) dialCheck(addr string) func() error {
	return func() error {
		conn, err := simnode.DialIn(c.netnsPath, "tcp", addr, time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

func (c *Cluster) startFakeGCE(ctx context.Context) error {
	p, err := c.start("fake-gce-metadata", filepath.Join(c.cfg.BinDir, "fake-gce-metadata"),
		"--listen="+metadataIP+":80", "--project=cluster-e2e-project", "--cluster-name=cluster-e2e",
		"--instance-name="+nodeName, "--log-format=json")
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 20*time.Second, c.dialCheck(metadataIP+":80"))
}

func (c *Cluster) makePKI(context.Context) error {
	p, err := newPKI(filepath.Join(c.Dir, "pki"))
	if err != nil {
		return err
	}
	ip := net.ParseIP
	for _, cert := range []struct {
		name, cn string
		orgs     []string
		server   bool
		ips      []net.IP
		dns      []string
	}{
		{"apiserver", "kube-apiserver", nil, true, []net.IP{ip(nodeIP), ip("127.0.0.1"), ip(serviceIP)},
			[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}},
		{"admin", "cluster-e2e-admin", []string{"system:masters"}, false, nil, nil},
		{"node", "system:node:" + nodeName, []string{"system:nodes"}, false, nil, nil},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, false, nil, nil},
		{"kubelet", nodeName, nil, true, []net.IP{ip(nodeIP), ip("127.0.0.1")}, []string{nodeName}},
	} {
		if err := p.issue(cert.name, cert.cn, cert.orgs, cert.server, cert.ips, cert.dns); err != nil {
			return err
		}
	}
	if err := p.serviceAccountKeys(); err != nil {
		return err
	}
	server := "https://" + nodeIP + ":6443"
	if err := p.kubeconfig(c.kubeconfig, server, "admin"); err != nil {
		return err
	}
	return p.kubeconfig(filepath.Join(c.Dir, "pki", "node.conf"), server, "node")
}

// mainCNIConflist is the node's main CNI (the config metaconceal chains onto): bridge
// (or ptp, Config.CNI) with host-local, then portmap, as containerd's own template; its
// name is unique per run so that libcni's cache entries of this run can be told apart.
func (c *Cluster) mainCNIConflist() string {
	main := fmt.Sprintf(`"type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,`, podBridge)
	if c.cfg.CNI == "ptp" {
		// A veth per pod; the node side holds the gateway address and a /32 route
		// to each pod, GKE's routed datapath.
		main = `"type": "ptp",
      "ipMasq": false,`
	}
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {
      %s
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
`, c.network, main, filepath.Join(c.nodeRoot, "var/lib/cni/networks"), podSubnet)
}

func (c *Cluster) writeMainCNI(context.Context) error {
	for _, name := range []string{c.cfg.CNI, "host-local", "loopback", "portmap"} {
		data, err := os.ReadFile(filepath.Join(c.cfg.BinDir, name))
		if err != nil {
			return fmt.Errorf("CNI plugin %s (make tools): %w", name, err)
		}
		if err := os.WriteFile(filepath.Join(c.nodeRoot, "opt/cni/bin", name), data, 0o755); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(c.nodeRoot, "etc/cni/net.d", "10-containerd-net.conflist"), []byte(c.mainCNIConflist()), 0o644)
}

func (c *Cluster) startEtcd(ctx context.Context) error {
	p, err := c.start("etcd", filepath.Join(c.cfg.ClusterBinDir, "etcd"),
		"--name=e2e", "--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--log-level=warn")
	if err != nil {
		return err
	}
	client := simnode.HTTPClientIn(c.netnsPath, 2*time.Second)
	return waitFor(ctx, p, 60*time.Second, func() error {
		resp, err := client.Get("http://127.0.0.1:2379/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("etcd /health: %s", resp.Status)
		}
		return nil
	})
}

func (c *Cluster) containerdConfig() string {
	return containerd.Config(containerd.ConfigParams{
		Dir: filepath.Join(c.Dir, "containerd"), Socket: c.socket, PauseImage: c.cfg.PauseRef,
		CNIBinDir: filepath.Join(c.nodeRoot, "opt/cni/bin"), CNIConfDir: filepath.Join(c.nodeRoot, "etc/cni/net.d"),
		DisableAppArmor: true,
	})
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	lease, err := containerd.AcquireLease(c.socket)
	if err != nil {
		return err
	}
	c.lease = lease
	cfgPath := filepath.Join(c.Dir, "containerd", "config.toml")
	if err := os.WriteFile(cfgPath, []byte(c.containerdConfig()), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "containerd", "crictl.yaml"), []byte(containerd.CrictlConfig(c.socket)), 0o644); err != nil {
		return err
	}
	p, err := c.start("containerd", "containerd", "--config", cfgPath)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, p, 60*time.Second, func() error {
		_, err := c.crictl(ctx, "info")
		return err
	}); err != nil {
		return err
	}
	for _, a := range append([]string{c.cfg.PauseArchive}, c.cfg.Images.All()...) {
		if a == "" {
			continue
		}
		if _, err := simnode.Run(ctx, "ctr", "-a", c.socket, "-n", "k8s.io", "images", "import", a); err != nil {
			return err
		}
	}
	out, err := simnode.Run(ctx, "ctr", "-a", c.socket, "-n", "k8s.io", "images", "ls", "-q")
	if err != nil {
		return err
	}
	c.logf("images: %s", strings.Join(strings.Fields(out), " "))
	return nil
}

// netnsDir is where containerd pins its sandboxes' netns (netns_mounts_under_state_dir:
// the CRI plugin's state dir, then netns).
func (c *Cluster) netnsDir() string {
	return filepath.Join(c.Dir, "containerd", "state", "io.containerd.grpc.v1.cri", "netns")
}

func (c *Cluster) crictl(ctx context.Context, args ...string) (string, error) {
	return simnode.Run(ctx, filepath.Join(c.cfg.BinDir, "crictl"), append([]string{"--config", filepath.Join(c.Dir, "containerd", "crictl.yaml")}, args...)...)
}

func (c *Cluster) pkiPath(name string) string { return filepath.Join(c.Dir, "pki", name) }

func (c *Cluster) startAPIServer(ctx context.Context) error {
	p, err := c.start("kube-apiserver", filepath.Join(c.cfg.ClusterBinDir, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--advertise-address="+nodeIP, "--bind-address=0.0.0.0", "--secure-port=6443",
		"--cert-dir="+filepath.Join(c.Dir, "pki", "apiserver-certs"),
		"--tls-cert-file="+c.pkiPath("apiserver.crt"), "--tls-private-key-file="+c.pkiPath("apiserver.key"),
		"--client-ca-file="+c.pkiPath("ca.crt"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC", "--allow-privileged=true",
		"--service-account-key-file="+c.pkiPath("sa.pub"),
		"--service-account-signing-key-file="+c.pkiPath("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--kubelet-client-certificate="+c.pkiPath("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+c.pkiPath("apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false", "--v=1")
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 120*time.Second, func() error {
		_, err := c.Kubectl(ctx, nil, "get", "--raw", "/readyz")
		return err
	})
}

func (c *Cluster) startControllers(ctx context.Context) error {
	common := []string{"--kubeconfig=" + c.kubeconfig, "--authentication-kubeconfig=" + c.kubeconfig,
		"--authorization-kubeconfig=" + c.kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1", "--v=1"}
	cm, err := c.start("kube-controller-manager", filepath.Join(c.cfg.ClusterBinDir, "kube-controller-manager"),
		append(slices.Clone(common),
			"--service-account-private-key-file="+c.pkiPath("sa.key"),
			"--root-ca-file="+c.pkiPath("ca.crt"),
			"--use-service-account-credentials=false",
			"--service-cluster-ip-range="+serviceCIDR)...)
	if err != nil {
		return err
	}
	sched, err := c.start("kube-scheduler", filepath.Join(c.cfg.ClusterBinDir, "kube-scheduler"), common...)
	if err != nil {
		return err
	}
	for _, w := range []struct {
		p    *containerd.Proc
		port string
	}{{cm, "10257"}, {sched, "10259"}} {
		if err := waitFor(ctx, w.p, 60*time.Second, c.dialCheck("127.0.0.1:"+w.port)); err != nil {
			return err
		}
	}
	return nil
}

// startKubeProxy runs kube-proxy (iptables mode, rules in the node netns), so that
// hostNetwork pods reach the API server through the kubernetes Service's ClusterIP,
// as in-cluster clients (client-go's in-cluster config) do. It sets no global sysctl:
// conntrack sizing is left alone, and localhost NodePorts (route_localnet) are off.
func (c *Cluster) startKubeProxy(ctx context.Context) error {
	cfgPath := filepath.Join(c.Dir, "kube-proxy-config.yaml")
	cfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: %q
hostnameOverride: %s
clusterCIDR: %s
bindAddress: 127.0.0.1
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
iptables:
  localhostNodePorts: false
conntrack:
  maxPerCore: 0
  min: 0
`, c.kubeconfig, nodeName, podSubnet)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	p, err := c.start("kube-proxy", filepath.Join(c.cfg.ClusterBinDir, "kube-proxy"), "--config="+cfgPath, "--v=1")
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 60*time.Second, c.dialCheck("127.0.0.1:10256"))
}

func (c *Cluster) kubeletConfig() string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[1]q}
authorization: {mode: Webhook}
tlsCertFile: %[2]q
tlsPrivateKeyFile: %[3]q
containerRuntimeEndpoint: unix://%[4]s
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
oomScoreAdj: 0
resolvConf: %[5]q
podLogsDir: %[6]q
clusterDomain: cluster.local
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
  imagefs.inodesFree: "1%%"
localStorageCapacityIsolation: false
`, c.pkiPath("ca.crt"), c.pkiPath("kubelet.crt"), c.pkiPath("kubelet.key"), c.socket,
		filepath.Join(c.Dir, "resolv.conf"), filepath.Join(c.Dir, "pod-logs"))
}

func (c *Cluster) startKubelet(ctx context.Context) error {
	if err := os.WriteFile(filepath.Join(c.Dir, "resolv.conf"), []byte("nameserver "+metadataIP+"\nsearch cluster.local\n"), 0o644); err != nil {
		return err
	}
	cfgPath := filepath.Join(c.Dir, "kubelet-config.yaml")
	if err := os.WriteFile(cfgPath, []byte(c.kubeletConfig()), 0o644); err != nil {
		return err
	}
	args := []string{"--config=" + cfgPath, "--kubeconfig=" + filepath.Join(c.Dir, "pki", "node.conf"),
		"--root-dir=" + filepath.Join(c.Dir, "kubelet"), "--cert-dir=" + filepath.Join(c.Dir, "pki", "kubelet-certs"),
		"--hostname-override=" + nodeName, "--node-ip=" + nodeIP, "--v=1"}
	if len(c.cfg.RegisterWithTaints) > 0 {
		args = append(args, "--register-with-taints="+strings.Join(c.cfg.RegisterWithTaints, ","))
	}
	p, err := c.start("kubelet", filepath.Join(c.cfg.ClusterBinDir, "kubelet"), args...)
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 60*time.Second, func() error {
		_, err := c.Kubectl(ctx, nil, "get", "node", nodeName)
		return err
	})
}

func (c *Cluster) waitNodeReady(ctx context.Context) error {
	var kubelet *containerd.Proc
	for _, p := range c.procs {
		if p.Name == "kubelet" {
			kubelet = p
		}
	}
	return waitFor(ctx, kubelet, 120*time.Second, func() error {
		out, err := c.Kubectl(ctx, nil, "get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if string(out) != "True" {
			return fmt.Errorf("node Ready=%q", out)
		}
		return nil
	})
}

// writeOverlays renders test/cluster/deploy (an overlay of conf/deploy that changes
// only node-specific paths) for this run's node root.
func (c *Cluster) writeOverlays(context.Context) error {
	for _, o := range []struct{ src, dst string }{
		{"test/cluster/deploy/kustomization.yaml", "deploy"},
		{"test/cluster/deploy/uninstall/kustomization.yaml", "deploy-uninstall"},
		{"test/cluster/deploy/helm-values.yaml", "helm"},
	} {
		data, err := os.ReadFile(filepath.Join(c.cfg.RepoRoot, o.src))
		if err != nil {
			return err
		}
		data = bytes.ReplaceAll(data, []byte("/NODE_ROOT"), []byte(c.nodeRoot))
		data = bytes.ReplaceAll(data, []byte("/CONTAINERD_SOCKET_DIR"), []byte(filepath.Dir(c.socket)))
		data = bytes.ReplaceAll(data, []byte("/CONTAINERD_SOCKET"), []byte(c.socket))
		data = bytes.ReplaceAll(data, []byte("/CONTAINERD_NETNS"), []byte(c.netnsDir()))
		dir := filepath.Join(c.Dir, o.dst)
		// kustomize accepts a resource dir outside the overlay, but only by a relative path.
		rel, err := filepath.Rel(dir, c.cfg.RepoRoot)
		if err != nil {
			return err
		}
		data = bytes.ReplaceAll(data, []byte("REPO_ROOT"), []byte(rel))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(o.src)), data, 0o644); err != nil {
			return err
		}
	}
	c.deployDir = filepath.Join(c.Dir, "deploy")
	c.uninstall = filepath.Join(c.Dir, "deploy-uninstall")
	return nil
}

// --- scenario.Cluster ---

// Kubectl runs bin/cluster/kubectl in the node netns with the admin kubeconfig.
func (c *Cluster) Kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + c.netnsPath,
		filepath.Join(c.cfg.ClusterBinDir, "kubectl"), "--kubeconfig=" + c.kubeconfig}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Nodes is the one node.
func (c *Cluster) Nodes() []string { return []string{nodeName} }

// NodeExec runs a command in the node netns (the node's filesystem is this machine's).
func (c *Cluster) NodeExec(ctx context.Context, node string, args ...string) ([]byte, error) {
	if node != nodeName {
		return nil, fmt.Errorf("no node %q", node)
	}
	out, err := simnode.Run(ctx, "nsenter", append([]string{"--net=" + c.netnsPath}, args...)...)
	return []byte(out), err
}

// NodeReadFile reads a node file.
func (c *Cluster) NodeReadFile(_ context.Context, node, path string) ([]byte, error) {
	if node != nodeName {
		return nil, fmt.Errorf("no node %q", node)
	}
	return os.ReadFile(path)
}

// Paths are this run's node paths.
func (c *Cluster) Paths() scenario.NodePaths {
	return scenario.NodePaths{
		CNIConfDir: filepath.Join(c.nodeRoot, "etc/cni/net.d"),
		CNIBinDir:  filepath.Join(c.nodeRoot, "opt/cni/bin"),
		StateDir:   stateDir,
	}
}

// DeployDir is the rendered overlay of conf/deploy.
func (c *Cluster) DeployDir() string { return c.deployDir }

// UninstallDir is the rendered overlay of conf/deploy/uninstall.
func (c *Cluster) UninstallDir() string { return c.uninstall }

// Helm runs the pinned helm (bin/tools/helm, `make helm`) in the node netns with the
// admin kubeconfig and its own config and cache dirs under the run's dir.
func (c *Cluster) Helm(ctx context.Context, args ...string) ([]byte, error) {
	home := filepath.Join(c.Dir, "helm-home")
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + c.netnsPath,
		filepath.Join(c.cfg.BinDir, "tools", "helm"), "--kubeconfig=" + c.kubeconfig}, args...)...)
	cmd.Env = append(os.Environ(), "HELM_CONFIG_HOME="+home, "HELM_CACHE_HOME="+home, "HELM_DATA_HOME="+home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// HelmValues is the rendered test/cluster/deploy/helm-values.yaml: the node-specific
// settings of the deploy overlay, for charts/metaconceal.
func (c *Cluster) HelmValues() string { return filepath.Join(c.Dir, "helm", "helm-values.yaml") }

// ChartDir is charts/metaconceal.
func (c *Cluster) ChartDir() string { return filepath.Join(c.cfg.RepoRoot, "charts", "metaconceal") }

// Images are the imported images.
func (c *Cluster) Images() scenario.Images {
	return scenario.Images{Metaconceal: images.MetaconcealRef, Update: images.UpdateRef, Probe: images.ProbeRef}
}

// --- teardown ---

// Close tears everything down; it goes through every step whatever fails and
// returns every error.
func (c *Cluster) Close() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	find := func(name string) *containerd.Proc {
		for _, p := range c.procs {
			if p.Name == name {
				return p
			}
		}
		return nil
	}
	// The kubelet first, so it does not restart what is being removed.
	if p := find("kubelet"); p != nil {
		errs = append(errs, p.Stop(15*time.Second))
	}
	// Every sandbox through the CRI: the runtime's CNI DEL removes IPs and state records.
	var ids []string
	if p := find("containerd"); p != nil && p.Running() {
		if out, err := c.crictl(ctx, "pods", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				if _, err := c.crictl(ctx, "stopp", id); err != nil {
					errs = append(errs, err)
				}
				if _, err := c.crictl(ctx, "rmp", "-f", id); err != nil {
					errs = append(errs, err)
				}
			}
		} else {
			errs = append(errs, fmt.Errorf("list sandboxes: %w", err))
		}
		if out, err := simnode.Run(ctx, "ctr", "-a", c.socket, "-n", "k8s.io", "containers", "ls", "-q"); err == nil {
			ids = append(ids, strings.Fields(out)...)
		}
	}
	ids = append(ids, c.containerIDsOnDisk()...)
	ids = append(ids, c.staleIDs...)
	// Then the processes, newest first.
	for i := len(c.procs) - 1; i >= 0; i-- {
		if c.procs[i].Name == "kubelet" {
			continue
		}
		errs = append(errs, c.procs[i].Stop(15*time.Second))
	}
	if c.socket != "" {
		errs = append(errs, containerd.KillShims(c.socket))
	}
	if c.Dir != "" {
		errs = append(errs, containerd.UnmountUnder(c.Dir)...)
	}
	errs = append(errs, c.removeOutside(ids)...)
	if c.netns != "" {
		errs = append(errs, simnode.DeleteNetns(c.netns))
	}
	errs = append(errs, restoreKernel(c.kernelBefore)...)
	if c.Dir != "" {
		// Never remove through a mount point that is still there.
		if left := containerd.MountsUnder(c.Dir); len(left) > 0 {
			errs = append(errs, fmt.Errorf("%s kept: still mounted: %s", c.Dir, strings.Join(left, " ")))
		} else if err := os.RemoveAll(c.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", c.Dir, err))
		}
	}
	if c.lock != nil {
		c.lock.Close()
	}
	return errors.Join(errs...)
}

// containerIDsOnDisk lists the sandbox and container ids containerd's CRI recorded.
func (c *Cluster) containerIDsOnDisk() []string {
	var ids []string
	for _, kind := range []string{"sandboxes", "containers"} {
		entries, _ := os.ReadDir(filepath.Join(c.Dir, "containerd", "root", "io.containerd.grpc.v1.cri", kind))
		for _, e := range entries {
			ids = append(ids, e.Name())
		}
	}
	return ids
}

// removeOutside removes what this run left outside its temp dir, and only that.
func (c *Cluster) removeOutside(ids []string) []error {
	var errs []error
	errs = append(errs, containerd.RemoveOutside(c.socket, c.network, ids)...)
	// State records this run's pods left (the plugin's DEL removes them; a crash may not).
	if entries, err := os.ReadDir(stateDir); err == nil {
		for _, e := range entries {
			data, err := os.ReadFile(filepath.Join(stateDir, e.Name()))
			if err == nil && c.network != "" && bytes.Contains(data, []byte(`"`+c.network+`"`)) {
				errs = append(errs, os.Remove(filepath.Join(stateDir, e.Name())))
			}
		}
	}
	// The kubelet's log symlinks for this run's containers.
	if entries, err := os.ReadDir(containerLogsDir); err == nil {
		for _, e := range entries {
			p := filepath.Join(containerLogsDir, e.Name())
			if target, err := os.Readlink(p); err == nil && c.Dir != "" && strings.HasPrefix(target, c.Dir+"/") {
				errs = append(errs, os.Remove(p))
			}
		}
	}
	// The device-plugins dir, when this run created it (the kubelet's socket and
	// checkpoint inside are this run's then).
	for _, d := range c.createdDirs {
		if d == devicePluginsDir {
			errs = append(errs, os.RemoveAll(d))
		}
	}
	// The shared k8s.io parents and directories go only with the last test runtime.
	errs = append(errs, c.lease.Release()...)
	for _, d := range c.createdDirs {
		_ = syscall.Rmdir(d) // only when empty
	}
	return errs
}

// kernelKeys are the settings the kubelet sets at start (its setupKernelTunables).
var kernelKeys = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

func readKernel() map[string]string {
	m := map[string]string{}
	for _, k := range kernelKeys {
		if data, err := os.ReadFile(filepath.Join("/proc/sys", k)); err == nil {
			m[k] = strings.TrimSpace(string(data))
		}
	}
	return m
}

func restoreKernel(before map[string]string) []error {
	var errs []error
	for k, v := range before {
		p := filepath.Join("/proc/sys", k)
		data, err := os.ReadFile(p)
		if err != nil || strings.TrimSpace(string(data)) == v {
			continue
		}
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s to %s: %w", p, v, err))
		}
	}
	return errs
}
