//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
)

// Attacks from pods: a pod with CAP_NET_ADMIN flushing its own rules (the host guard
// still conceals), other ports and protocols to the metadata address, other spellings
// of it, and bypass paths. metadata.google.internal through the pod's hosts file is
// hostsfile_test.go's.

func TestNetAdminFlushStillConcealed(t *testing.T) {
	e := shared(t)
	p := e.newPod(t, tenantNS, "attacker", false)
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
	harness.FlushAll(context.Background(), p.netns)
	if rules := rulesOfOurs(t, p.netns); rules != "" {
		t.Fatalf("flush left rules in the pod's netns, the attack did not happen:\n%s", rules)
	}
	e.requireConcealed(t, p.netns, metadataURL+kubeEnvPath)
	e.requireConcealed(t, p.netns, metadataURL+identityPath)
}

// Ports GCE serves nothing on (53, 123 and 8080 are gcenet_test.go's), UDP and ICMP to
// the metadata address: nothing from a pod, with or without its own rules, gets there.
func TestOtherPortsAndProtocols(t *testing.T) {
	e := shared(t)
	ctx := context.Background()
	pods := []pod{e.newPod(t, tenantNS, "ports-plain", false), e.flushedPod(t, "ports-flushed")}
	tcp, err := harness.ListenTCPWitness(e.NS.Path, "169.254.169.254:8443")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	udp, err := harness.ListenUDPWitness(e.NS.Path, "169.254.169.254:5353")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	// Controls: from the node each probe does get an answer, so a failure from the
	// pod means the pod was stopped, not that the probe cannot see an answer.
	if r := harness.Curl(ctx, e.NS.Path, "http://169.254.169.254:8443/"); !strings.Contains(r.Body, "REACHED") {
		t.Fatalf("control: TCP 8443 from the node not answered: %s", r)
	}
	if err := harness.UDPExchange(e.NS.Path, "169.254.169.254:5353", 2*time.Second); err != nil {
		t.Fatalf("control: UDP 5353 from the node not answered: %v", err)
	}
	if err := harness.Ping(e.NS.Path, "169.254.169.254", 2*time.Second); err != nil {
		t.Fatalf("control: ping from the node not answered: %v", err)
	}
	tcpBefore, udpBefore := tcp.Hits(), udp.Hits()
	for _, p := range pods {
		if r := harness.Curl(ctx, p.netns, "http://169.254.169.254:8443/"); r.Exit == 0 || strings.Contains(r.Body, "REACHED") {
			t.Errorf("%s: TCP 8443 to the metadata IP got through: %s", p.name, r)
		}
		if err := harness.UDPExchange(p.netns, "169.254.169.254:5353", 2*time.Second); err == nil {
			t.Errorf("%s: UDP 5353 to the metadata IP was answered", p.name)
		}
		if err := harness.Ping(p.netns, "169.254.169.254", 2*time.Second); err == nil {
			t.Errorf("%s: ICMP echo to the metadata IP was answered", p.name)
		}
	}
	if n := tcp.Hits() - tcpBefore; n != 0 {
		t.Errorf("%d TCP connection(s) from pods reached 169.254.169.254:8443", n)
	}
	if n := udp.Hits() - udpBefore; n != 0 {
		t.Errorf("%d UDP datagram(s) from pods reached 169.254.169.254:5353", n)
	}
}

// Other spellings of the metadata address: never kube-env, never 200, from a pod with
// its rules and from one that flushed them.
func TestOtherSpellings(t *testing.T) {
	e := shared(t)
	ctx := context.Background()
	pods := []pod{e.newPod(t, tenantNS, "spell-plain", false), e.flushedPod(t, "spell-flushed")}
	if out, err := simnode.Run(ctx, "nsenter", "--net="+pods[0].netns, "ip", "-6", "addr", "show", "scope", "global"); err == nil && strings.TrimSpace(out) == "" {
		t.Log("the pod has no global IPv6 address; ::ffff:169.254.169.254 is still tried: a dual-stack socket sends it as IPv4")
	}
	cases := []struct {
		name string
		args []string
	}{
		{"IPv4-mapped IPv6", []string{"-g", "http://[::ffff:169.254.169.254]" + kubeEnvPath}},
		{"decimal IP", []string{"http://2852039166" + kubeEnvPath}},
		{"hex IP", []string{"http://0xa9fea9fe" + kubeEnvPath}},
	}
	for _, p := range pods {
		for _, c := range cases {
			r := harness.MetadataGet(ctx, p.netns, "", c.args...)
			e.requireNoSecret(t, p.name+" "+c.name, r)
			if r.Status == 200 {
				t.Errorf("%s %s: 200 for kube-env: %s", p.name, c.name, r)
			}
			t.Logf("%s %s: %s", p.name, c.name, r)
		}
	}
}

// Bypass paths against the metadata address and the proxy directly: concealed or
// denied, never kube-env content.
func TestBypassPaths(t *testing.T) {
	e := shared(t)
	ctx := context.Background()
	p := e.newPod(t, tenantNS, "bypass", false)
	paths := []struct {
		path  string
		extra []string
	}{
		{"//computeMetadata/v1/instance/attributes/kube-env", nil},
		{"/computeMetadata/v1//instance/attributes//kube-env", nil},
		{"/computeMetadata/v1/./instance/attributes/./kube-env", nil},
		{"/computeMetadata/v1/instance/attributes/x/../kube-env", nil},
		{"/computeMetadata/v1/instance/attributes%2Fkube-env", nil},
		{"/computeMetadata/v1/instance/attributes/kube%2denv", nil},
		{"/computeMetadata/v1/instance/attributes/x/%2e%2e/kube-env", nil},
		{"/computeMetadata/v1/instance/attributes/KUBE-ENV", nil},
		{"/computeMetadata/v1/instance/attributes/kube-env/", nil},
		{"/computeMetadata/v1/instance/attributes/kube-env?alt=json", nil},
		{"/computeMetadata/v1beta1/instance/attributes/kube-env", nil},
		{"/0.1/meta-data/attributes/kube-env", nil},
		{"/computeMetadata/v1/instance/?recursive=true", nil},
		{"/computeMetadata/v1/instance/attributes/?recursive=true", nil},
		{"/computeMetadata/v1/?recursive=true&alt=json", nil},
		{"/computeMetadata/v1/instance/?%72ecursive=true", nil},
		{"/computeMetadata/v1/instance/attributes/kube-env", []string{"-H", "X-Forwarded-For: 10.0.0.1"}},
		{"/computeMetadata/v1/instance/service-accounts/default/../../attributes/kube-env", []string{"--path-as-is"}},
	}
	for _, base := range []string{metadataURL, proxyURL} {
		for _, c := range paths {
			args := append([]string{"--path-as-is"}, c.extra...)
			r := harness.MetadataGet(ctx, p.netns, base+c.path, args...)
			label := base + c.path + " " + strings.Join(c.extra, " ")
			e.requireNoSecret(t, label, r)
			if r.Status < 300 {
				t.Errorf("%s: want concealed or denied, got %s", label, r)
			}
		}
	}
}
