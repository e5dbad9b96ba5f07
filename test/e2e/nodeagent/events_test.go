//go:build e2e

package nodeagent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// TestPodEvents sends concealed and denied requests through the real proxy handler,
// whose audit point notifies the podevents recorder, which writes through client-go's
// broadcaster and correlator with the agent's token (shipped RBAC) to a real API
// server. It checks reasons, messages, the per-pod rate limit and that one pod's
// flood does not silence another.
func TestPodEvents(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "nsenter")
	c := newCluster(t)
	ctx := context.Background()
	c.node(t, "node-a")
	agent := c.agentClient(t, "node-a")

	// Two pods, known to the proxy by their state records (source IPs on loopback).
	stateDir := t.TempDir()
	pods := map[string]*corev1.Pod{}
	for i, name := range []string{"looper", "quiet"} {
		if _, err := c.admin.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{}); err != nil {
			if _, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			// No controller-manager here to make it.
			if _, err := c.admin.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		pod, err := c.admin.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
			Spec:       corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pods[name] = pod
		ip := netip.MustParseAddr(fmt.Sprintf("127.0.0.%d", 11+i))
		rec := state.NewRecord(state.Attachment{Network: "podnet", ContainerID: "sandbox-" + name, IfName: "eth0", Netns: "/x"},
			state.PodRef{Namespace: "shop", Name: name, UID: string(pod.UID)}, []netip.Addr{ip}, "")
		if err := state.Write(stateDir, rec); err != nil {
			t.Fatal(err)
		}
	}

	const burst = 3
	rec, err := podevents.New(podevents.Config{Client: agent, Component: "metaconceal-proxy", Node: "node-a", Burst: burst, QPS: 1.0 / 3600})
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Close()
	pol, err := policy.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	pods2 := podindex.New(stateDir, nil)
	pods2.Refresh(true) // what the proxy's refresher does when the records appear
	h, err := proxy.New(proxy.Config{
		Upstream: &url.URL{Scheme: "http", Host: "127.0.0.1:1"}, // blocked requests never go upstream
		Policy:   pol, Pods: pods2, Notify: rec,
		Log: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Events name only attested pods: loopback plays the attested listener (on a node,
	// the host guard DNATs a recorded pod's connections to it).
	srv := proxy.NewServer(h, slog.New(slog.DiscardHandler))
	go func() { _ = srv.Serve(h.ListenerFor(ln, podindex.Attested)) }()
	defer srv.Close()

	ask := func(from, path string) int {
		t.Helper()
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			Proxy:       nil,
			DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}).DialContext,
		}}
		req, _ := http.NewRequest(http.MethodGet, "http://"+ln.Addr().String()+path, nil)
		req.Header.Set("Metadata-Flavor", "Google")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	const kubeEnv = "/computeMetadata/v1/instance/attributes/kube-env"
	for range 40 { // a pod looping on kube-env
		if st := ask("127.0.0.11", kubeEnv); st != http.StatusForbidden {
			t.Fatalf("kube-env answered %d, want 403", st)
		}
	}
	if st := ask("127.0.0.12", "/0.1/meta-data/"); st != http.StatusForbidden {
		t.Fatalf("legacy API answered %d, want 403", st)
	}

	events := func(pod string) []corev1.Event {
		t.Helper()
		list, err := c.admin.CoreV1().Events("shop").List(ctx, metav1.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("involvedObject.name", pod).String()})
		if err != nil {
			t.Fatal(err)
		}
		return list.Items
	}
	var looper, quiet []corev1.Event
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		looper, quiet = events("looper"), events("quiet")
		if total(looper) >= burst && len(quiet) > 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // anything beyond the limit would have arrived by now
	looper, quiet = events("looper"), events("quiet")

	if n := total(looper); n != burst {
		t.Errorf("looper: %d Events counted for 40 concealed requests, want exactly the burst %d: %+v", n, burst, looper)
	}
	for _, e := range looper {
		if e.Type != corev1.EventTypeWarning || e.Reason != podevents.ReasonConcealed || e.InvolvedObject.Kind != "Pod" ||
			e.InvolvedObject.UID != pods["looper"].UID || e.Source.Component != "metaconceal-proxy" || e.Source.Host != "node-a" ||
			!strings.Contains(e.Message, kubeEnv) || !strings.Contains(e.Message, policy.RuleKubeEnv.String()) {
			t.Errorf("looper Event %s %s %q on %+v from %+v", e.Type, e.Reason, e.Message, e.InvolvedObject, e.Source)
		}
	}
	if len(quiet) != 1 || quiet[0].Reason != podevents.ReasonDenied || !strings.Contains(quiet[0].Message, "/0.1/meta-data/") ||
		!strings.Contains(quiet[0].Message, policy.RuleLegacyAPI.String()) || quiet[0].InvolvedObject.UID != pods["quiet"].UID {
		t.Errorf("quiet: %+v, want one MetadataDenied naming the path and rule despite the looper's flood", quiet)
	}
	t.Logf("looper: %d Event objects, count %d, for 40 requests; quiet: %q", len(looper), total(looper), quiet[0].Message)
}

func total(events []corev1.Event) int {
	n := 0
	for _, e := range events {
		n += int(e.Count)
	}
	return n
}
