package charts_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/chart"
	"github.com/metaconceal/metaconceal/internal/testlib/metricrefs"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TargetLabels are the labels Prometheus puts on every scraped series itself.
var TargetLabels = []string{"instance", "job"}

// refs are the names the chart's alerts and dashboard use.
func refs(t *testing.T, alerts, dashboard []byte) []metricrefs.Ref {
	t.Helper()
	a, err := metricrefs.FromAlerts(alerts)
	if err != nil {
		t.Fatal(err)
	}
	d, err := metricrefs.FromDashboard(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	return append(a, d...)
}

// TestMetricNamesExported: every metric and label that an alert or a dashboard panel
// names is exported by a real program: the proxy (host guard on) and the node agent
// (repair=report, self-test on) run in a simulated node, get traffic that makes their
// series appear (a concealed and an allowed request, 429s, a guard repair), and their
// /metrics are scraped. A misspelled name in a copy of the files is caught.
func TestMetricNamesExported(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "go", "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")
	exported := scrapePrograms(t)
	for m, labels := range metricrefs.ClusterOnly {
		exported[m] = map[string]bool{}
		for _, l := range labels {
			exported[m][l] = true
		}
	}
	dir := filepath.Join(chart.Dir(t), "files")
	alerts, err := os.ReadFile(filepath.Join(dir, "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dashboard, err := os.ReadFile(filepath.Join(dir, "dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range exported.Check(refs(t, alerts, dashboard), TargetLabels...) {
		t.Error(p)
	}

	// The same check fails on a misspelled metric or label, in the alerts and in the
	// dashboard.
	for _, tc := range []struct {
		file, old, new, want string
	}{
		{"alerts", "(metaconceal_unprotected_pods)", "(metaconceal_unprotected_pod)", "metric metaconceal_unprotected_pod is not exported"},
		{"alerts", "by (instance, reason) (rate(metaconceal_proxy_upstream_errors_total", "by (instance, reasons) (rate(metaconceal_proxy_upstream_errors_total", "label reasons"},
		{"alerts", `{reason=~"pod_.*"}`, `{cause=~"pod_.*"}`, "has no label cause"},
		{"alerts", "{{ $labels.family }}", "{{ $labels.famliy }}", "label famliy"},
		{"dashboard", "metaconceal_proxy_requests_total", "metaconceal_proxy_request_total", "metric metaconceal_proxy_request_total is not exported"},
		{"dashboard", `"{{verdict}}"`, `"{{verdcit}}"`, "label verdcit"},
		{"dashboard", "metaconceal_proxy_upstream_duration_seconds_bucket", "metaconceal_proxy_upstream_duration_bucket", "not exported"},
	} {
		a, d := string(alerts), string(dashboard)
		target := &a
		if tc.file == "dashboard" {
			target = &d
		}
		changed := strings.Replace(*target, tc.old, tc.new, 1)
		if changed == *target {
			t.Errorf("%s no longer holds %q: update this test", tc.file, tc.old)
			continue
		}
		*target = changed
		problems := exported.Check(refs(t, []byte(a), []byte(d)), TargetLabels...)
		if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.want) }) {
			t.Errorf("%s with %q: problems %q, want one with %q", tc.file, tc.new, problems, tc.want)
		}
	}
}

// scrapePrograms runs the proxy and the node agent in a simulated node and returns
// what their /metrics export.
func scrapePrograms(t *testing.T) metricrefs.Exported {
	t.Helper()
	var proxyBin, agentBin, fakeBin string
	for _, b := range []struct {
		dst       *string
		pkg, name string
	}{
		{&proxyBin, "github.com/metaconceal/metaconceal/cmd/metaconceal-proxy", "metaconceal-proxy"},
		{&agentBin, "github.com/metaconceal/metaconceal/cmd/metaconceal-install", "metaconceal-install"},
		{&fakeBin, "github.com/metaconceal/metaconceal/test/cmd/fake-gce-metadata", "fake-gce-metadata"},
	} {
		*b.dst = testutil.BuildVersioned(t, b.pkg, b.name, "1.2.3-test", "abc123")
	}
	node, err := simnode.New("mc-metrics")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := func(bin string, args ...string) <-chan struct{} {
		cmd := node.Command(ctx, bin, args...)
		logf, err := os.Create(filepath.Join(t.TempDir(), filepath.Base(bin)+".log"))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			_ = cmd.Process.Signal(os.Interrupt)
			<-exited
			if t.Failed() {
				out, _ := os.ReadFile(logf.Name())
				t.Logf("%s output:\n%s", filepath.Base(bin), out)
			}
		})
		return exited
	}
	start(fakeBin, "--listen", simnode.MetadataIP+":80", "--gce-services=false")
	// Unattributed requests (from the node itself) share one small budget: a pod rate of
	// 1/s with a burst of 1 makes the third request in a row a 429.
	proxyExited := start(proxyBin, "--listen", simnode.ProxyIP+":988", "--alts-listen=", "--metrics-listen=127.0.0.1:989",
		"--state-dir", t.TempDir(), "--guard-reconcile-interval=1s", "--pod-rate=1", "--pod-burst=1", "--log-format=text")
	stateDir := t.TempDir()
	binDir, confDir := t.TempDir(), t.TempDir()
	plugin := filepath.Join(t.TempDir(), "metaconceal")
	if err := os.WriteFile(plugin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	conflist := `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.0.0/24"}}]}`
	if err := os.WriteFile(filepath.Join(confDir, "10-bridge.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	agentExited := start(agentBin, "--cni-bin-dir", binDir, "--cni-conf-dir", confDir, "--plugin-binary", plugin,
		"--metrics-listen=127.0.0.1:990", "--repair=report", "--cri-socket", filepath.Join(t.TempDir(), "none.sock"),
		"--selftest-interval=1s", "--state-dir", stateDir)

	if _, err := simnode.GetWhenUp(ctx, node.Path, "http://127.0.0.1:989/readyz", proxyExited); err != nil {
		t.Fatal(err)
	}
	client := simnode.HTTPClientIn(node.Path, 5*time.Second)
	base := "http://" + simnode.ProxyIP + ":988/computeMetadata/v1/"
	for _, path := range []string{"instance/attributes/kube-env", "project/project-id", "project/project-id", "project/project-id", "project/project-id"} {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Metadata-Flavor", "Google")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// Take the proxy's address off lo: the guard's reconciliation puts it back and counts it.
	if _, err := node.Exec(ctx, "ip", "addr", "del", simnode.ProxyIP+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	exported := metricrefs.Exported{}
	var proxyBody string
	for deadline := time.Now().Add(30 * time.Second); ; {
		proxyBody, err = simnode.GetWhenUp(ctx, node.Path, "http://127.0.0.1:989/metrics", proxyExited)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(proxyBody, "metaconceal_guard_repairs_total{") || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	agentBody, err := simnode.GetWhenUp(ctx, node.Path, "http://127.0.0.1:990/metrics", agentExited)
	if err != nil {
		t.Fatal(err)
	}
	for _, body := range []string{proxyBody, agentBody} {
		if err := exported.AddExposition(body); err != nil {
			t.Fatal(err)
		}
	}
	return exported
}
