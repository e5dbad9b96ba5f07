//go:build e2e

// Package e2e is the real-runtime end-to-end test: containerd 1.6 + runc (Debian's)
// inside a simulated node's network namespace, pods made with crictl, the metaconceal
// CNI plugin in the conflist from conf/, the proxy with its host guard, the fake GCE
// metadata server as upstream (internal/testlib/harness builds all of it). Every check runs
// from inside a sandbox's own network namespace.
//
// One rule: every test makes the pods it checks and removes them when it ends; no test
// or subtest reads state another one set. Tests that only add and remove pods share
// one node, started by the first of them and closed by TestMain, and run in parallel;
// a test that changes the node itself (stops the proxy, removes the host guard,
// another conflist) or compares node-wide state builds a node of its own with setup.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

const (
	tenantNS     = "e2e-tenant"
	identityPath = "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://e2e.example"
	tokenPath    = "/computeMetadata/v1/instance/service-accounts/default/token"

	// Short names for the harness's.
	metadataURL   = harness.MetadataURL
	proxyURL      = harness.ProxyURL
	metadataIP6   = harness.MetadataIP6
	podSubnet6    = harness.PodSubnet6
	excludedNS    = harness.ExcludedNS
	kubeEnvPath   = harness.KubeEnvPath
	projectIDPath = harness.ProjectIDPath
	concealedBody = harness.ConcealedBody
)

// runtimeTools are what every test here needs on PATH.
var runtimeTools = []string{"containerd", "runc", "ctr", "iptables", "ip", "nsenter", "curl"}

func TestMain(m *testing.M) {
	harness.RunResolverProbe() // exits when this process is Resolve's probe
	hostBefore, hostErr := harness.HostRules(context.Background())
	code := m.Run()
	if err := closeShared(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: removing the shared node: %v\n", err)
		code = max(code, 1)
	}
	// The machine's own netns untouched over the whole run (each test also checks its
	// own span, see begin).
	if hostErr == nil && os.Geteuid() == 0 {
		after, err := harness.HostRules(context.Background())
		if err != nil || after != hostBefore {
			fmt.Fprintf(os.Stderr, "e2e: the machine's own iptables changed (%v):\nbefore:\n%s\nafter:\n%s\n", err, hostBefore, after)
			code = max(code, 1)
		}
	}
	os.Exit(code)
}

// env is a node as the tests use it.
type env struct{ *harness.Node }

var sharedEnv struct {
	once  sync.Once
	env   *env
	err   error
	setup time.Duration
}

// begin starts a test: the privileged gate (failing, not skipping, as root), and a
// check when the test ends that the machine's own iptables hold the same lines naming
// the metadata/proxy addresses or metaconceal as when it began.
func begin(t *testing.T, tools ...string) {
	t.Helper()
	testutil.RequirePrivileged(t, append(runtimeTools, tools...)...)
	before := hostRules(t)
	t.Cleanup(func() {
		if after := hostRules(t); after != before {
			t.Errorf("the machine's own iptables changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

func hostRules(t *testing.T) string {
	t.Helper()
	rules, err := harness.HostRules(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

// shared returns the package's shared node (IPv4 conflist from conf/), starting it on
// first use. Tests using it only add and remove pods of their own and look only at
// those, so they run in parallel (after the tests with nodes of their own).
func shared(t *testing.T, tools ...string) *env {
	t.Helper()
	begin(t, tools...)
	t.Parallel()
	sharedEnv.once.Do(func() {
		start := time.Now()
		n, err := harness.StartNode(context.Background(), harness.NodeConfig{})
		sharedEnv.setup, sharedEnv.err = time.Since(start), err
		if err == nil {
			sharedEnv.env = &env{n}
		}
		t.Logf("shared node: setup (pause image, containerd, fake GCE, proxy) took %s", sharedEnv.setup.Round(time.Millisecond))
	})
	if sharedEnv.err != nil {
		t.Fatalf("shared node: %v", sharedEnv.err)
	}
	e := sharedEnv.env
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(e.LogTails())
		}
	})
	return e
}

func closeShared() error {
	if sharedEnv.env == nil {
		return nil
	}
	return sharedEnv.env.Close()
}

// setup builds a node of the test's own, removed when the test ends; metaconceal,
// when given, are more keys of the plugin's conflist entry (e.g. {"alts": "reject"}).
func setup(t *testing.T, dualStack bool, metaconceal ...map[string]any) *env {
	t.Helper()
	begin(t)
	start := time.Now()
	keys := map[string]any{}
	for _, m := range metaconceal {
		for k, v := range m {
			keys[k] = v
		}
	}
	n, err := harness.StartNode(context.Background(), harness.NodeConfig{DualStack: dualStack, Metaconceal: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node setup (pause image, containerd, fake GCE, proxy) took %s", time.Since(start).Round(time.Millisecond))
	e := &env{n}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(e.LogTails())
		}
		if err := e.Close(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return e
}

type pod struct {
	id, namespace, name string
	netns               string // the sandbox's netns path; empty for hostNetwork
	sb                  harness.Sandbox
}

func (e *env) newPod(t *testing.T, namespace, name string, hostNetwork bool) pod {
	t.Helper()
	return e.newPodSpec(t, harness.PodSpec{Name: name, Namespace: namespace, HostNetwork: hostNetwork})
}

// newPodSpec makes a pod that the test's cleanup removes. Unless the pod may go to
// the metadata server directly (hostNetwork, excluded namespace), the cleanup also
// checks that the fake server logged no request from any of its addresses: every
// request of a pod metaconceal covers arrives from the proxy.
func (e *env) newPodSpec(t *testing.T, spec harness.PodSpec) pod {
	t.Helper()
	since := e.FakeLogSize()
	hp, err := e.StartPod(context.Background(), spec)
	if hp.ID != "" {
		t.Cleanup(func() { e.retirePod(t, spec, hp, since) })
	}
	if err != nil {
		t.Fatalf("pod %s/%s: %v\ncontainerd log:\n%s", spec.Namespace, spec.Name, err, harness.Tail(e.RT.LogPath, 15))
	}
	return pod{id: hp.ID, namespace: hp.Namespace, name: hp.Name, netns: hp.Netns, sb: hp.Sandbox}
}

func (e *env) retirePod(t *testing.T, spec harness.PodSpec, hp harness.Pod, since int) {
	if !spec.HostNetwork && spec.Namespace != excludedNS && len(hp.Sandbox.IPs) > 0 {
		direct, err := e.DirectRequests(since, hp.Sandbox.IPs)
		if err != nil {
			t.Errorf("pod %s/%s: %v", spec.Namespace, spec.Name, err)
		} else if len(direct) != 0 {
			t.Errorf("pod %s/%s (%v) reached the metadata server directly:\n%s", spec.Namespace, spec.Name, hp.Sandbox.IPs, strings.Join(direct, "\n"))
		}
	}
	if e.RT.Known(hp.ID) {
		if err := e.RT.RemovePod(context.Background(), hp.ID); err != nil {
			t.Errorf("remove pod %s/%s: %v", spec.Namespace, spec.Name, err)
		}
	}
}

// flushedPod is a pod that used CAP_NET_ADMIN to flush and delete every chain of
// every table in its netns: none of the plugin's rules is left (checked).
func (e *env) flushedPod(t *testing.T, name string) pod {
	t.Helper()
	p := e.newPod(t, tenantNS, name, false)
	harness.FlushAll(context.Background(), p.netns)
	if rules := rulesOfOurs(t, p.netns); rules != "" {
		t.Fatalf("flush left rules in the pod's netns, the attack did not happen:\n%s", rules)
	}
	return p
}

func (e *env) requireConcealed(t *testing.T, netns, url string) {
	t.Helper()
	r := harness.MetadataGet(context.Background(), netns, url)
	e.requireNoSecret(t, url, r)
	// The proxy's body is the one line; a trailing newline is tolerated, nothing else.
	if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
		t.Errorf("%s: want 403 %q, got %s", url, concealedBody, r)
	}
}

func (e *env) requireNoSecret(t *testing.T, label string, r harness.CurlResult) {
	t.Helper()
	if strings.Contains(r.Body, e.SecretLine) || strings.Contains(r.Body, `"kube-env"`) {
		t.Errorf("%s: kube-env content leaked: %s", label, r)
	}
}

func (e *env) cniCallsFor(t *testing.T, id string) []harness.CNICall {
	t.Helper()
	calls, err := e.CNICallsFor(id)
	if err != nil {
		t.Fatal(err)
	}
	return calls
}

// directRequests is the fake server's log lines from offset since on from pod
// addresses (all pods: from nil) that went around the proxy.
func (e *env) directRequests(t *testing.T, since int, from []string) []string {
	t.Helper()
	direct, err := e.DirectRequests(since, from)
	if err != nil {
		t.Fatal(err)
	}
	return direct
}

func rulesOfOurs(t *testing.T, netnsPath string) string {
	t.Helper()
	rules, err := harness.RulesOfOurs(context.Background(), netnsPath)
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

func rulesOfOursIn(t *testing.T, f *os.File) string {
	t.Helper()
	rules, err := harness.RulesOfOursIn(f)
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(data)
}

func matchingLines(text string, words ...string) []string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		ok := true
		for _, w := range words {
			if !strings.Contains(line, w) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			out = append(out, line)
		}
	}
	return out
}
