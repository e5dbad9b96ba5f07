//go:build e2e

package e2e

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/state"
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

	t.Run("pod with IPv6: kube-env concealed on both families", func(t *testing.T) {
		pod6 := e.newPod(t, tenantNS, "dual-a", false)
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
		if r.Status != 200 || r.Body != e.ProjectID {
			t.Errorf("project-id over IPv6: want 200 %q, got %s", e.ProjectID, r)
		}
	})

	t.Run("other ports to the IPv6 metadata address", func(t *testing.T) {
		pod6 := e.newPod(t, tenantNS, "dual-ports", false)
		tcp, err := harness.ListenTCPWitness(e.NS.Path, "["+metadataIP6+"]:8443")
		if err != nil {
			t.Fatal(err)
		}
		defer tcp.Close()
		if r := harness.Curl(ctx, e.NS.Path, "-g", "http://["+metadataIP6+"]:8443/"); !strings.Contains(r.Body, "REACHED") {
			t.Fatalf("control: TCP 8443 on the IPv6 metadata address not answered from the node: %s", r)
		}
		before := tcp.Hits()
		if r := harness.Curl(ctx, pod6.netns, "-g", "http://["+metadataIP6+"]:8443/"); r.Exit == 0 || strings.Contains(r.Body, "REACHED") {
			t.Errorf("TCP 8443 to the IPv6 metadata address got through: %s", r)
		}
		if n := tcp.Hits() - before; n != 0 {
			t.Errorf("%d connection(s) from the pod reached [%s]:8443", n, metadataIP6)
		}
	})

	t.Run("attack: CAP_NET_ADMIN pod flushes its tables, then asks over IPv6", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "dual-attacker", false)
		e.requireConcealed(t, p.netns, kubeEnv6)
		harness.FlushAll(ctx, p.netns)
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

	t.Run("pod removal leaves the IPv6 rules to the netns", func(t *testing.T) {
		p := e.newPod(t, tenantNS, "dual-short-lived", false)
		held, err := os.Open(p.netns)
		if err != nil {
			t.Fatalf("open pod netns: %v", err)
		}
		defer held.Close()
		before := rulesOfOursIn(t, held)
		if !strings.Contains(before, "ip6tables") {
			t.Fatalf("no IPv6 rule of ours in the pod's netns before removal; the check below would prove nothing:\n%s", before)
		}
		if err := e.RT.RemovePod(ctx, p.id); err != nil {
			t.Fatalf("remove pod: %v", err)
		}
		// DEL removes the record only; the rules of both families go with the netns.
		if rules := rulesOfOursIn(t, held); rules != before {
			t.Errorf("DEL changed the rules in the pod's netns:\nbefore:\n%s\nafter:\n%s", before, rules)
		}
		if _, err := state.Read(e.StateDir, p.id, "eth0"); err == nil {
			t.Errorf("state record still there after removal")
		}
	})

	t.Run("no concealed pod reached the metadata server directly", func(t *testing.T) {
		if direct := e.directRequests(t, 0, nil); len(direct) != 0 {
			t.Errorf("requests from pod IPs reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
		}
	})
}
