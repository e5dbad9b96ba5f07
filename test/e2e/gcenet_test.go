//go:build e2e

// GCE's other services on the metadata address, through the real runtime: DNS (UDP and
// TCP 53), NTP (UDP 123) and the ALTS handshaker (TCP 8080, relayed by the proxy, which
// carries the handshaker service's gRPC calls and nothing else) keep
// working for concealed pods, while kube-env stays concealed, also for a pod that
// flushed its own rules (host guard).
package e2e

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/gce"
)

const (
	dnsAddr  = "169.254.169.254:53"
	ntpAddr  = "169.254.169.254:123"
	altsAddr = "169.254.169.254:8080"
	// refusedWithin is how fast a refused port must fail: a REJECT answers at once.
	refusedWithin = time.Second
)

// requireResolves checks, over UDP and TCP, that the pod's own resolver (its
// resolv.conf naming the metadata address) resolves GCE's and the fake's names and
// reports a name that does not exist as such.
func (e *env) requireResolves(t *testing.T, label string, p pod) {
	t.Helper()
	ctx := context.Background()
	resolvConf, hosts := e.RT.ResolvConf(p.id), e.RT.HostsFile(p.id)
	for _, network := range []string{"udp", "tcp"} {
		for name, want := range map[string]string{
			gce.MetadataHostname: gce.MetadataIPv4.String(),
			"metadata":           gce.MetadataIPv4.String(),
			fakegce.TestName:     fakegce.TestNameAddr.String(),
		} {
			got, err := harness.Resolve(ctx, p.netns, resolvConf, hosts, network, name)
			if err != nil || len(got) != 1 || got[0] != want {
				t.Errorf("%s: %s over %s: %q, %v; want %s", label, name, network, got, err, want)
			}
		}
		if got, err := harness.Resolve(ctx, p.netns, resolvConf, hosts, network, "no-such-name.metaconceal.test"); !errors.Is(err, harness.ErrNameNotFound) {
			t.Errorf("%s: unknown name over %s: %q, %v; want not found", label, network, got, err)
		}
	}
}

// resolverPod makes a pod as dnsPolicy: Default does on a GCE node: its resolv.conf
// names the metadata address (checked).
func (e *env) resolverPod(t *testing.T, name string) pod {
	t.Helper()
	p := e.newPodSpec(t, harness.PodSpec{Name: name, Namespace: tenantNS, DNSServers: []string{gce.MetadataIPv4.String()}})
	if conf := readFile(t, e.RT.ResolvConf(p.id)); !strings.Contains(conf, "nameserver "+gce.MetadataIPv4.String()) {
		t.Fatalf("the sandbox's resolv.conf does not name the metadata address:\n%s", conf)
	}
	return p
}

func requireRefusedPromptly(t *testing.T, label, netns, network, addr string) {
	t.Helper()
	took, err := simnode.DialRefused(netns, network, addr)
	switch {
	case err != nil:
		t.Errorf("%s: %v", label, err)
	case took > refusedWithin:
		t.Errorf("%s: %s to %s refused after %v, want within %v", label, network, addr, took, refusedWithin)
	}
}

// requireALTSOnly checks that from the pod, 8080 carries the gRPC call of ALTS's
// handshaker client through the relay and nothing else: HTTP/1.1 and h2c requests for
// other paths get no answer, the fake server's ALTS stand-in logs none of them, and
// the proxy audits the refusals naming the pod's namespace.
func (e *env) requireALTSOnly(t *testing.T, label, netns string) {
	t.Helper()
	since := len(readFile(t, e.FakeLog))
	if err := simnode.ALTSExchange(netns, altsAddr); err != nil {
		t.Errorf("%s: 8080 through the relay: %v", label, err)
	}
	if err := simnode.ALTSOthersUnanswered(netns, altsAddr); err != nil {
		t.Errorf("%s: 8080 answered what is not the handshaker service:\n%v", label, err)
	}
	var served []string
	for _, line := range strings.Split(readFile(t, e.FakeLog)[since:], "\n") {
		if strings.Contains(line, "ALTS stand-in request") {
			served = append(served, line)
		}
	}
	if len(served) != 1 || !strings.Contains(served[0], "path="+fakegce.ALTSHandshakerPath+" ") {
		t.Errorf("%s: the ALTS stand-in behind the relay served:\n%s\nwant the handshaker call only", label, strings.Join(served, "\n"))
	}
	var audited []string
	for _, line := range strings.Split(readFile(t, e.ProxyLog), "\n") {
		if strings.Contains(line, "ALTS relay: connection refused") && strings.Contains(line, tenantNS) {
			audited = append(audited, line)
		}
	}
	for _, reason := range []string{"http1", "path", "not_grpc"} {
		if !regexp.MustCompile(`reason(=|":")` + reason + `\b`).MatchString(strings.Join(audited, "\n")) {
			t.Errorf("%s: no audit line naming the pod's namespace for reason %s:\n%s", label, reason, strings.Join(audited, "\n"))
		}
	}
}

func TestRealRuntimeGCEServices(t *testing.T) {
	testutil.RequirePrivileged(t, "containerd", "runc", "ctr", "iptables", "ip", "nsenter", "unshare", "mount", "curl")
	ctx := context.Background()
	e := setup(t, false)

	// Controls: the node reaches every service directly.
	if err := simnode.NTPQuery(e.NS.Path, ntpAddr); err != nil {
		t.Fatalf("control: NTP from the node: %v", err)
	}
	if err := simnode.ALTSExchange(e.NS.Path, altsAddr); err != nil {
		t.Fatalf("control: ALTS port from the node: %v", err)
	}

	t.Run("resolver pod: DNS over UDP and TCP and NTP answer, kube-env concealed", func(t *testing.T) {
		resolver := e.resolverPod(t, "resolver")
		e.requireResolves(t, "resolver pod", resolver)
		if err := simnode.NTPQuery(resolver.netns, ntpAddr); err != nil {
			t.Errorf("NTP from the pod: %v", err)
		}
		e.requireConcealed(t, resolver.netns, metadataURL+kubeEnvPath)
	})

	t.Run("ALTS pod: 8080 reaches the metadata server's 8080 through the relay", func(t *testing.T) {
		relay := e.newPod(t, tenantNS, "grpc-client", false)
		e.requireALTSOnly(t, "ALTS pod", relay.netns)
		for _, probe := range []struct{ network, addr string }{{"tcp", "169.254.169.254:443"}, {"udp", "169.254.169.254:5353"}} {
			requireRefusedPromptly(t, "ALTS pod", relay.netns, probe.network, probe.addr)
		}
		e.requireConcealed(t, relay.netns, metadataURL+kubeEnvPath)
		// The relay attributes the connection to the pod's namespace.
		m := harness.Curl(ctx, e.NS.Path, "http://127.0.0.1:9988/metrics")
		if !regexp.MustCompile(`metaconceal_proxy_alts_connections_total\{namespace="` + tenantNS + `"\} [1-9]`).MatchString(m.Body) {
			t.Errorf("relay metrics do not count the pod's namespace %s:\n%s", tenantNS, strings.Join(matchingLines(m.Body, "alts"), "\n"))
		}
	})

	t.Run("host guard: a pod's own rules flushed, DNS works and kube-env stays concealed", func(t *testing.T) {
		resolver := e.resolverPod(t, "flushed-resolver")
		harness.FlushAll(ctx, resolver.netns)
		if rules := rulesOfOurs(t, resolver.netns); rules != "" {
			t.Fatalf("flush left rules in the pod's netns:\n%s", rules)
		}
		e.requireResolves(t, "flushed resolver pod", resolver)
		if err := simnode.NTPQuery(resolver.netns, ntpAddr); err != nil {
			t.Errorf("NTP from the flushed pod: %v", err)
		}
		e.requireConcealed(t, resolver.netns, metadataURL+kubeEnvPath)
		e.requireConcealed(t, resolver.netns, metadataURL+identityPath)
		e.requireALTSOnly(t, "flushed pod, through the guard's DNAT to the relay", resolver.netns)
		requireRefusedPromptly(t, "flushed pod", resolver.netns, "tcp", "169.254.169.254:443")
		requireRefusedPromptly(t, "flushed pod", resolver.netns, "udp", "169.254.169.254:5353")
	})

	t.Run("no concealed pod reached the metadata server's HTTP port directly", func(t *testing.T) {
		if direct := e.directRequests(t, 0, nil); len(direct) != 0 {
			t.Errorf("requests from pod IPs reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
		}
	})
}

// A pod of a network whose conflist says "alts": "reject" is refused on 8080 at once,
// keeps DNS and NTP, and kube-env stays concealed.
func TestRealRuntimeALTSReject(t *testing.T) {
	testutil.RequirePrivileged(t, "containerd", "runc", "ctr", "iptables", "ip", "nsenter", "unshare", "mount", "curl")
	e := setup(t, false, map[string]any{"alts": "reject"})
	p := e.resolverPod(t, "no-alts")
	if rules := rulesOfOurs(t, p.netns); strings.Contains(rules, "8080") {
		t.Errorf("alts reject: the pod's rules redirect 8080:\n%s", rules)
	}
	requireRefusedPromptly(t, "alts reject pod", p.netns, "tcp", altsAddr)
	e.requireResolves(t, "alts reject pod", p)
	if err := simnode.NTPQuery(p.netns, ntpAddr); err != nil {
		t.Errorf("NTP from the pod: %v", err)
	}
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
}
