//go:build e2e

// Package nodeagent proves the node agent's parts against real components: the
// readiness gate, the shipped RBAC and the optional own-node policy against a real
// kube-apiserver + etcd (internal/testlib/kubeapi), Events on pods from the proxy's audit point
// through client-go's broadcaster to that API server, and the repair against a real
// containerd (internal/testlib/harness). No client-go fakes.
package nodeagent

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/metaconceal/metaconceal/internal/testlib/kubeapi"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/conflist"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
	"github.com/metaconceal/metaconceal/pkg/repair"
)

const (
	agentNS = "metaconceal-system"
	agentSA = "metaconceal"
)

// cluster is one API server with conf/deploy's namespace, service account and RBAC.
type cluster struct {
	s     *kubeapi.Server
	admin kubernetes.Interface
	root  string
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	root, err := testutil.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	s := kubeapi.Start(t)
	c := &cluster{s: s, admin: s.Client(t), root: root}
	for _, f := range []string{"namespace.yaml", "serviceaccount.yaml", "rbac.yaml"} {
		kubeapi.Apply(t, c.admin, filepath.Join(root, "conf", "deploy", f), agentNS)
	}
	return c
}

func (c *cluster) node(t *testing.T, name string, taints ...corev1.Taint) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}},
		Spec: corev1.NodeSpec{Taints: taints}}
	if _, err := c.admin.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// agentClient is the DaemonSet pod's identity on node: a service account token bound
// to a pod scheduled there, as the projected volume in daemonset.yaml gives it.
func (c *cluster) agentClient(t *testing.T, node string) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "metaconceal-" + node, Namespace: agentNS},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: agentSA, AutomountServiceAccountToken: new(bool),
			Containers: []corev1.Container{{Name: "agent", Image: "metaconceal:dev"}}},
	}
	pod, err := c.admin.CoreV1().Pods(agentNS).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exp := int64(3600)
	tr, err := c.admin.CoreV1().ServiceAccounts(agentNS).CreateToken(ctx, agentSA, &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return kubeapi.MustClient(t, c.s.TokenConfig(tr.Status.Token))
}

func (c *cluster) taints(t *testing.T, node string) []corev1.Taint {
	t.Helper()
	n, err := c.admin.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n.Spec.Taints
}

// TestReadinessGate drives the gate with its real checks (the conflist in a conf dir,
// an HTTP /readyz, the host guard's iptables rules in a node netns) and the shipped
// RBAC against a real API server.
func TestReadinessGate(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "nsenter", "iptables", "iptables-save", "iptables-restore")
	c := newCluster(t)
	ctx := context.Background()
	other := corev1.Taint{Key: "example.com/dedicated", Value: "x", Effect: corev1.TaintEffectNoSchedule}
	// Registered as kubelet --register-with-taints=metaconceal.io/not-ready=:NoSchedule does.
	c.node(t, "node-a", other, nodegate.Taint)
	agent := c.agentClient(t, "node-a")

	confDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(confDir, "10-net.conflist"),
		[]byte(`{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var ready atomic.Bool
	readyz := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready: metadata server", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	}))
	defer readyz.Close()
	node := c.s.Node // the node's netns: the host guard goes there
	guardProbe := nodegate.HostGuardInstalled("")
	var reported atomic.Int32 // what OnChange said last (the agent's gate gauge): -1 nothing yet
	reported.Store(-1)
	gate, err := nodegate.New(nodegate.Config{
		Client: agent, Node: "node-a", Grace: 500 * time.Millisecond, Resync: time.Hour,
		OnChange: func(open bool) {
			if open {
				reported.Store(1)
			} else {
				reported.Store(0)
			}
		},
		Log: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Checks: []nodegate.Check{
			{Name: "cni-entry", Keep: true, Probe: func(context.Context) error { _, err := repair.LoadPluginConf(confDir); return err }},
			{Name: "proxy-ready", Probe: nodegate.HTTPReady(readyz.URL + "/readyz")},
			{Name: "host-guard", Probe: func(ctx context.Context) error {
				return simnode.In(node.Path, func() error { return guardProbe(ctx) })
			}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	step := func(wantTainted bool, why string) {
		t.Helper()
		if err := gate.Step(ctx); err != nil {
			t.Fatalf("%s: step: %v", why, err)
		}
		taints := c.taints(t, "node-a")
		if nodegate.HasTaint(taints) != wantTainted || gate.Open() == wantTainted {
			t.Fatalf("%s: taints %v, gate open %v; want tainted=%v", why, taints, gate.Open(), wantTainted)
		}
		if r := reported.Load(); r != -1 && (r == 1) == wantTainted {
			t.Fatalf("%s: OnChange last reported open=%v, want %v", why, r == 1, !wantTainted)
		}
		found := false
		for _, tt := range taints {
			found = found || (tt.Key == other.Key && tt.Value == other.Value && tt.Effect == other.Effect)
		}
		if !found {
			t.Fatalf("%s: the other taint %v is gone: %v", why, other, taints)
		}
	}

	step(true, "nothing ready")
	if _, err := conflist.Install(confDir, conflist.Entry{Mode: "SECURE", Proxy: "169.254.169.252:988"}); err != nil {
		t.Fatal(err)
	}
	step(true, "entry in the conflist, proxy not ready")
	ready.Store(true)
	step(true, "entry and proxy, no host guard")
	gcfg := hostguard.Config{ListenAddrs: []netip.AddrPort{netip.MustParseAddrPort("169.254.169.252:988")}, KeepConntrack: true}
	if err := simnode.In(node.Path, func() error { return hostguard.Install(ctx, gcfg, nil) }); err != nil {
		t.Fatal(err)
	}
	step(false, "everything ready")
	step(false, "still ready (no API call needed)")

	ready.Store(false)
	step(false, "an open gate does not close on a proxy readiness blip")
	if _, err := conflist.Uninstall(confDir); err != nil {
		t.Fatal(err)
	}
	step(false, "entry gone, within the grace")
	time.Sleep(600 * time.Millisecond)
	step(true, "entry gone beyond the grace")
	step(true, "still gone")
	if _, err := conflist.Install(confDir, conflist.Entry{Mode: "SECURE", Proxy: "169.254.169.252:988"}); err != nil {
		t.Fatal(err)
	}
	step(true, "entry back, proxy not ready: a closed gate waits for every check")
	ready.Store(true)
	step(false, "entry back and proxy ready")

	// The shipped RBAC gives the agent nothing else.
	if _, err := agent.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent lists pods: %v; want Forbidden", err)
	}
	if err := agent.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent deletes a node: %v; want Forbidden", err)
	}
	if _, err := agent.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("agent lists nodes: %v; want Forbidden", err)
	}
}

// TestOwnNodePolicy applies conf/deploy/optional/own-node-policy.yaml and checks that
// the agent's token may change only its own node's readiness taint.
func TestOwnNodePolicy(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "nsenter")
	c := newCluster(t)
	ctx := context.Background()
	c.node(t, "node-a", nodegate.Taint)
	c.node(t, "node-b", nodegate.Taint)
	agent := c.agentClient(t, "node-a")
	kubeapi.Apply(t, c.admin, filepath.Join(c.root, "conf", "deploy", "optional", "own-node-policy.yaml"), "")

	patch := func(node, body string) error {
		_, err := agent.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(body), metav1.PatchOptions{})
		return err
	}
	// The policy takes effect once the API server has compiled it: wait until the
	// foreign node is refused (the only change it refuses that RBAC allows).
	untaint := `{"spec":{"taints":null}}`
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := patch("node-b", untaint)
		if apierrors.IsForbidden(err) || apierrors.IsInvalid(err) {
			if !strings.Contains(err.Error(), "only the node its pod runs on") {
				t.Fatalf("node-b refused for another reason: %v", err)
			}
			break
		}
		if err == nil {
			// Applied before the policy was active: put the taint back and retry.
			if _, err := c.admin.CoreV1().Nodes().Patch(ctx, "node-b", types.MergePatchType,
				[]byte(`{"spec":{"taints":[{"key":"`+nodegate.TaintKey+`","effect":"NoSchedule"}]}}`), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
		} else {
			t.Fatalf("patch node-b: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the own-node policy never refused a foreign node within 30s")
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !nodegate.HasTaint(c.taints(t, "node-b")) {
		t.Fatal("node-b lost its taint")
	}
	for _, bad := range []struct{ name, body string }{
		{"label", `{"metadata":{"labels":{"evil":"yes"}}}`},
		{"other taint", `{"spec":{"taints":[{"key":"` + nodegate.TaintKey + `","effect":"NoSchedule"},{"key":"x","effect":"NoExecute"}]}}`},
		{"unschedulable", `{"spec":{"unschedulable":true}}`},
	} {
		if err := patch("node-a", bad.body); err == nil || !(apierrors.IsForbidden(err) || apierrors.IsInvalid(err)) {
			t.Errorf("%s on its own node: %v; want refused by the policy", bad.name, err)
		}
	}
	// The gate's own change goes through.
	gate, err := nodegate.New(nodegate.Config{Client: agent, Node: "node-a",
		Checks: []nodegate.Check{{Name: "ok", Probe: func(context.Context) error { return nil }}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := gate.Step(ctx); err != nil {
		t.Fatalf("the gate on its own node under the policy: %v", err)
	}
	if nodegate.HasTaint(c.taints(t, "node-a")) {
		t.Error("node-a still tainted after the gate opened")
	}
	var statusErr *apierrors.StatusError
	if err := patch("node-b", untaint); !errors.As(err, &statusErr) {
		t.Errorf("node-b untainted by node-a's agent: %v", err)
	}
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
