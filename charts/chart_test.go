// Package charts_test checks charts/metaconceal with the pinned helm (tools/helm):
// helm lint, golden renders of the default and the GKE preset, the values schema's
// refusals, and the alerts with the pinned promtool (tools/promtool).
package charts_test

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/metaconceal/metaconceal/internal/testlib/chart"
	"github.com/metaconceal/metaconceal/internal/testlib/manifest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// TestLint: helm lint --strict passes for the default values and every preset file.
func TestLint(t *testing.T) {
	t.Parallel()
	for _, values := range [][]string{nil, {"-f", filepath.Join(chart.Dir(t), "values-gke.yaml")}} {
		out, err := chart.Helm(t, append([]string{"lint", "--strict", chart.Dir(t)}, values...)...)
		if err != nil {
			t.Errorf("helm lint %v: %v\n%s", values, err, out)
		}
	}
}

// TestGolden: `helm template` of the default, the GKE preset and every optional object
// equals testdata/<name>.golden.yaml (-update rewrites them).
func TestGolden(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		want []string // in the render: what the case is about
	}{
		{"default", nil, []string{"path: /opt/cni/bin", "maxSurge: 10%", "maxUnavailable: 0", "--mode=SECURE"}},
		{"gke", []string{"-f", filepath.Join(chart.Dir(t), "values-gke.yaml")}, []string{"path: /home/kubernetes/bin"}},
		{"monitoring", []string{"--set", "metrics.host=0.0.0.0", "--set", "monitoring.podMonitor.enabled=true",
			"--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
			"--set", "monitoring.dashboard.enabled=true", "--set", "ownNodePolicy.enabled=true"},
			[]string{"kind: PodMonitor", "kind: ServiceMonitor", "kind: PrometheusRule", "alert: MetaconcealUnprotectedPods", "grafana_dashboard", "--metrics-listen=0.0.0.0:989"}},
		{"cleanup-gke", []string{"--set", "cleanup=true", "-f", filepath.Join(chart.Dir(t), "values-gke.yaml")},
			[]string{"name: metaconceal-uninstall", "path: /home/kubernetes/bin", "- remove-host-guard"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out, err := chart.Template(t, "metaconceal-system", tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("render lacks %q", w)
				}
			}
			golden := filepath.Join("testdata", tc.name+".golden.yaml")
			if *update {
				if err := os.WriteFile(golden, []byte(out), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (go test ./charts -update)", err)
			}
			if out != string(want) {
				t.Errorf("helm template differs from %s (go test ./charts -update, then review the diff):\n%s", golden, firstDiff(string(want), out))
			}
		})
	}
}

// firstDiff shows the first line where got differs from want.
func firstDiff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			return "line " + strconv.Itoa(i+1) + ":\n  want: " + w + "\n  got:  " + g
		}
	}
	return ""
}

// TestSchemaRefuses: a bad value is refused before anything renders, by the schema (or,
// for a combination, the chart's own check), with a message naming it.
func TestSchemaRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		set  string
		want []string // all in the message
	}{
		// Enums: Helm names the value's path and the choices.
		{"mode=SECRET", []string{"'/mode'", "SECURE", "EXPOSED"}},
		{"preset=eks", []string{"'/preset'", "gke"}},
		{"alts=maybe", []string{"'/alts'", "relay"}},
		{"repair=fix", []string{"'/repair'", "report"}},
		{"iptablesBackend=nftables", []string{"'/iptablesBackend'", "legacy"}},
		{"image.pullPolicy=Sometimes", []string{"'/image/pullPolicy'"}},
		{"metrics.host=10.0.0.1", []string{"'/metrics/host'", "0.0.0.0"}},
		// Patterns: the path and the value.
		{"cni.binDir=opt/cni/bin", []string{"'/cni/binDir'", "opt/cni/bin"}},
		{"cni.confDir=", []string{"'/cni/confDir'"}},
		{"criSocket=run/containerd.sock", []string{"'/criSocket'", "run/containerd.sock"}},
		{"image.digest=sha256:abc", []string{"'/image/digest'", "sha256:abc"}},
		{"excludeNamespaces={Kube_System}", []string{"'/excludeNamespaces/0'", "Kube_System"}},
		{"proxy.extraArgs={-v}", []string{"'/proxy/extraArgs/0'", "-v"}},
		// Types and unknown keys.
		{"repairInterval=30", []string{"'/repairInterval'", "want string"}},
		{"events=yes", []string{"'/events'", "want boolean"}},
		{"mdoe=SECURE", []string{"'mdoe' not allowed"}},
		{"cni.bindir=/opt/cni/bin", []string{"'bindir' not allowed"}},
		// Not the schema's: a monitor cannot scrape the node's loopback.
		{"monitoring.podMonitor.enabled=true", []string{"metrics.host", "127.0.0.1"}},
	} {
		t.Run(tc.set, func(t *testing.T) {
			t.Parallel()
			out, err := chart.Template(t, "metaconceal-system", "--set", tc.set)
			if err == nil {
				t.Fatalf("--set %s rendered:\n%.300s", tc.set, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("--set %s: message does not name %q:\n%v", tc.set, w, err)
				}
			}
		})
	}
}

// TestSchemaAccepts: every documented choice renders (the schema is not stricter than
// the values say).
func TestSchemaAccepts(t *testing.T) {
	t.Parallel()
	for _, set := range []string{
		"mode=EXPOSED", "mode=UNSPECIFIED", "alts=reject", "repair=report", "repair=off", "events=false",
		"readinessGate=false", "selftestInterval=0s", "selftestInterval=5s", "iptablesBackend=legacy",
		"cni.binDir=/var/lib/cni/bin", "excludeNamespaces={kube-system,batch}", "metrics.host=0.0.0.0",
		"image.digest=sha256:" + strings.Repeat("ab", 32), "priorityClassName=", "tolerations=null",
	} {
		t.Run(set, func(t *testing.T) {
			t.Parallel()
			out, err := chart.Template(t, "metaconceal-system", "--set", set)
			if err != nil {
				t.Fatal(err)
			}
			docs, err := chart.Split(out)
			if err != nil {
				t.Fatal(err)
			}
			// The DaemonSet decodes strictly, and every mount has its volume.
			var ds appsv1.DaemonSet
			manifest.Decode(t, set, []byte(docs["templates/daemonset.yaml"][0]), &ds)
			spec := ds.Spec.Template.Spec
			for _, c := range append(spec.InitContainers, spec.Containers...) {
				for _, m := range c.VolumeMounts {
					if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name }) {
						t.Errorf("container %s mounts undefined volume %s", c.Name, m.Name)
					}
				}
			}
		})
	}
}

// TestPromtoolRules: the alerts pass `promtool check rules` and their unit tests
// (testdata/alerts_test.yaml) pass `promtool test rules`; a rule file with a broken
// expression fails the check (promtool really parses it).
func TestPromtoolRules(t *testing.T) {
	t.Parallel()
	promtool := chart.Tool(t, "promtool")
	alerts := filepath.Join(chart.Dir(t), "files", "alerts.yaml")
	for _, args := range [][]string{{"check", "rules", alerts}, {"test", "rules", filepath.Join("testdata", "alerts_test.yaml")}} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	data, err := os.ReadFile(alerts)
	if err != nil {
		t.Fatal(err)
	}
	broken := filepath.Join(t.TempDir(), "alerts.yaml")
	bad := strings.Replace(string(data), "max by (instance) (metaconceal_unprotected_pods) > 0", "max by (instance) (metaconceal_unprotected_pods > 0", 1)
	if bad == string(data) {
		t.Fatal("the unprotected-pods expression moved: update this test")
	}
	if err := os.WriteFile(broken, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", broken).CombinedOutput(); err == nil {
		t.Errorf("promtool check rules accepted a broken expression:\n%s", out)
	}
}
