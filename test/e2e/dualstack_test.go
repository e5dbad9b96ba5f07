//go:build e2e

package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/test/e2e/harness"
	"github.com/metaconceal/metaconceal/test/simnode"
)

// TestRealRuntimeDualStack runs pods with an IPv6 address next to IPv4 (the dual-stack
// conflist from conf/), on a node whose metadata server also answers on GCE's IPv6
// metadata address fd20:ce::254, with the proxy also on [fd20:ce::252]:988.
func TestRealRuntimeDualStack(t *testing.T) {
	testutil.RequirePrivileged(t, "containerd", "runc", "ctr", "iptables", "ip6tables", "ip", "nsenter", "curl")
	ctx := context.Background()
	begin := time.Now()
	e := setup(t, true)
	t.Logf("setup took %s", time.Since(begin).Round(time.Millisecond))
	kubeEnv6 := "http://[" + metadataIP6 + "]" + kubeEnvPath

	var pod6 pod
	t.Run("pod with IPv6: kube-env concealed on both families", func(t *testing.T) {
		pod6 = e.newPod(t, tenantNS, "dual-a", false)
		out, err := simnode.Run(ctx, "nsenter", "--net="+pod6.netns, "ip", "-6", "addr", "show", "scope", "global")
		if err != nil || !strings.Contains(out, "fd00:77::") {
			t.Fatalf("the pod has no IPv6 address from %s: %q %v", podSubnet6, out, err)
		}
		e.requireConcealed(t, pod6.netns, kubeEnv6)
		e.requireConcealed(t, pod6.netns, metadataURL+kubeEnvPath)
		r := harness.MetadataGet(ctx, pod6.netns, "", "-g", "http://[::ffff:169.254.169.254]"+kubeEnvPath)
		e.requireNoSecret(t, "::ffff:169.254.169.254", r)
		if r.Status == 200 {
			t.Errorf("::ffff:169.254.169.254: 200 for kube-env: %s", r)
		}
		r = harness.MetadataGet(ctx, pod6.netns, "http://["+metadataIP6+"]"+projectIDPath)
		if r.Status != 200 || r.Body != e.projectID {
			t.Errorf("project-id over IPv6: want 200 %q, got %s", e.projectID, r)
		}
	})

	t.Run("other ports to the IPv6 metadata address", func(t *testing.T) {
		if pod6.id == "" {
			t.Fatal("the dual-stack pod was not created")
		}
		tcp, err := harness.ListenTCPWitness(e.node.Path, "["+metadataIP6+"]:8080")
		if err != nil {
			t.Fatal(err)
		}
		defer tcp.Close()
		if r := harness.Curl(ctx, e.node.Path, "-g", "http://["+metadataIP6+"]:8080/"); !strings.Contains(r.Body, "REACHED") {
			t.Fatalf("control: TCP 8080 on the IPv6 metadata address not answered from the node: %s", r)
		}
		before := tcp.Hits()
		if r := harness.Curl(ctx, pod6.netns, "-g", "http://["+metadataIP6+"]:8080/"); r.Exit == 0 || strings.Contains(r.Body, "REACHED") {
			t.Errorf("TCP 8080 to the IPv6 metadata address got through: %s", r)
		}
		if n := tcp.Hits() - before; n != 0 {
			t.Errorf("%d connection(s) from the pod reached [%s]:8080", n, metadataIP6)
		}
	})

	t.Run("attack: CAP_NET_ADMIN pod flushes its tables, then asks over IPv6", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "dual-attacker", false)
		e.requireConcealed(t, p.netns, kubeEnv6)
		flushAll(ctx, p.netns)
		if rules := rulesOfOurs(t, p.netns); rules != "" {
			t.Fatalf("flush left rules in the pod's netns:\n%s", rules)
		}
		e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
		r := harness.MetadataGet(ctx, p.netns, kubeEnv6)
		e.requireNoSecret(t, "IPv6 after flush", r)
		if r.Status == 200 {
			t.Errorf("after the flush, kube-env over IPv6 answered 200 (the host guard does not cover %s): %s", metadataIP6, r)
		}
	})

	t.Run("pod removal leaves no IPv6 rule", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "dual-short-lived", false)
		held, err := os.Open(p.netns)
		if err != nil {
			t.Fatalf("open pod netns: %v", err)
		}
		defer held.Close()
		if rules := rulesOfOursIn(t, held); !strings.Contains(rules, "ip6tables") {
			t.Fatalf("no IPv6 rule of ours in the pod's netns before removal; the check below would prove nothing:\n%s", rules)
		}
		if err := e.rt.RemovePod(ctx, p.id); err != nil {
			t.Fatalf("remove pod: %v", err)
		}
		if rules := rulesOfOursIn(t, held); rules != "" {
			t.Errorf("rules of ours left in the pod's netns after DEL:\n%s", rules)
		}
	})

	t.Run("no concealed pod reached the metadata server directly", func(t *testing.T) {
		log := readFile(t, e.fakeLog)
		if direct := directRequests(log, nil); len(direct) != 0 {
			t.Errorf("requests from pod IPs reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
		}
	})
}

// flushAll is what a pod holding CAP_NET_ADMIN can do to its own netns: flush and
// delete every chain of every table, with every iptables binary it may have.
func flushAll(ctx context.Context, netnsPath string) {
	for _, tool := range []string{"iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"} {
		if _, err := exec.LookPath(tool); err != nil {
			continue
		}
		for _, table := range []string{"nat", "filter", "mangle", "raw"} {
			for _, op := range []string{"-F", "-X"} {
				// A table a backend does not hold is not an error worth failing on;
				// the caller checks afterwards that no rule of ours is left.
				_, _ = simnode.Run(ctx, "nsenter", "--net="+netnsPath, tool, "-w", "-t", table, op)
			}
		}
	}
}
