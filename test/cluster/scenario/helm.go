package scenario

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/metricrefs"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
)

// How a run installs metaconceal (cluster-e2e --install, $CLUSTER_INSTALL): kubectl
// applies the deploy dir (conf/deploy's overlay); helm installs charts/metaconceal with
// the same node-specific settings, as docs/install.md says.
const (
	InstallKubectl = "kubectl"
	InstallHelm    = "helm"
)

// Installers lists the choices.
var Installers = []string{InstallKubectl, InstallHelm}

// HelmScenario is the scenario that only a Helm install runs.
const HelmScenario = "helm-install"

// HelmCluster is a provider that can run the pinned helm (bin/tools/helm).
type HelmCluster interface {
	// Helm runs helm against the cluster (admin credentials) and returns its stdout.
	Helm(ctx context.Context, args ...string) ([]byte, error)
	// HelmValues is a values file with the node-specific settings of DeployDir's overlay.
	HelmValues() string
	// ChartDir is charts/metaconceal.
	ChartDir() string
}

const (
	helmRelease      = "metaconceal"
	cleanupRelease   = "metaconceal-cleanup"
	cleanupNamespace = "metaconceal-uninstall"
)

func helmOf(env *Env) (HelmCluster, error) {
	h, ok := env.Cluster.(HelmCluster)
	if !ok {
		return nil, errf("this provider cannot run helm (--install=%s)", InstallHelm)
	}
	return h, nil
}

// createNamespace is docs/install.md's first step for Helm: the namespace, with the
// privileged Pod Security level (Helm stores the release in it before anything else).
func createNamespace(ctx context.Context, env *Env, ns string) error {
	if _, err := kubectl(ctx, env, nil, "create", "namespace", ns); err != nil {
		return err
	}
	_, err := kubectl(ctx, env, nil, "label", "namespace", ns, "pod-security.kubernetes.io/enforce=privileged")
	return err
}

// installObjects creates metaconceal's objects: kubectl apply -k, or helm install.
func installObjects(ctx context.Context, env *Env) error {
	if env.Install != InstallHelm {
		_, err := kubectl(ctx, env, nil, "apply", "-k", env.Cluster.DeployDir())
		return err
	}
	h, err := helmOf(env)
	if err != nil {
		return err
	}
	if err := createNamespace(ctx, env, deployNamespace); err != nil {
		return err
	}
	_, err = h.Helm(ctx, "install", helmRelease, h.ChartDir(), "--namespace", deployNamespace, "-f", h.HelmValues())
	return err
}

// uninstallObjects is the documented uninstall after the workloads are gone: the
// objects (kubectl delete -k, or helm uninstall and the namespace), then the cleanup
// on every node (the uninstall DaemonSet from conf/deploy/uninstall, or the chart with
// cleanup=true), waited for and removed.
func uninstallObjects(ctx context.Context, env *Env) error {
	step := time.Now()
	if env.Install != InstallHelm {
		if _, err := kubectl(ctx, env, nil, "delete", "-k", env.Cluster.DeployDir(), "--timeout=120s"); err != nil {
			return err
		}
		env.Logf("kubectl delete -k: %.1fs", time.Since(step).Seconds())
		step = time.Now()
		if _, err := kubectl(ctx, env, nil, "apply", "-k", env.Cluster.UninstallDir()); err != nil {
			return err
		}
	} else {
		h, err := helmOf(env)
		if err != nil {
			return err
		}
		if _, err := h.Helm(ctx, "uninstall", helmRelease, "--namespace", deployNamespace, "--wait", "--timeout=120s"); err != nil {
			return err
		}
		if _, err := kubectl(ctx, env, nil, "delete", "namespace", deployNamespace, "--timeout=120s"); err != nil {
			return err
		}
		env.Logf("helm uninstall and namespace deleted: %.1fs", time.Since(step).Seconds())
		step = time.Now()
		if err := createNamespace(ctx, env, cleanupNamespace); err != nil {
			return err
		}
		if _, err := h.Helm(ctx, "install", cleanupRelease, h.ChartDir(), "--namespace", cleanupNamespace,
			"-f", h.HelmValues(), "--set", "cleanup=true"); err != nil {
			return err
		}
	}
	if _, err := kubectl(ctx, env, nil, "-n", cleanupNamespace, "rollout", "status", "daemonset/metaconceal-uninstall", "--timeout=180s"); err != nil {
		return fmt.Errorf("%w\n%s", err, describePods(ctx, env, cleanupNamespace, "app.kubernetes.io/name=metaconceal-uninstall"))
	}
	env.Logf("cleanup DaemonSet done: %.1fs", time.Since(step).Seconds())
	step = time.Now()
	if env.Install != InstallHelm {
		if _, err := kubectl(ctx, env, nil, "delete", "-k", env.Cluster.UninstallDir(), "--timeout=120s"); err != nil {
			return err
		}
	} else {
		h, _ := helmOf(env) // checked above
		if _, err := h.Helm(ctx, "uninstall", cleanupRelease, "--namespace", cleanupNamespace, "--wait", "--timeout=120s"); err != nil {
			return err
		}
		if _, err := kubectl(ctx, env, nil, "delete", "namespace", cleanupNamespace, "--timeout=120s"); err != nil {
			return err
		}
	}
	env.Logf("cleanup removed: %.1fs", time.Since(step).Seconds())
	return nil
}

var helmWorkloadManifest = namespaceDoc("{{.WorkloadNamespace}}") + probePod("helm-check", "{{.WorkloadNamespace}}", probeSpec{})

// helmInstall: the release is deployed, the DaemonSet is the chart's (Helm's
// annotations, maxSurge 10% with maxUnavailable 0, no declared ports) and ready on every
// node, and each node is protected: the CNI entry is in place, the readiness taint is
// gone, a pod's kube-env request is concealed and the datapath self-test holds. The
// node agent's real /metrics export what the alerts and the dashboard name that the
// unit test cannot see (metricrefs.ClusterOnly).
func helmInstall(ctx context.Context, env *Env) (string, error) {
	h, err := helmOf(env)
	if err != nil {
		return "", err
	}
	out, err := h.Helm(ctx, "status", helmRelease, "--namespace", deployNamespace, "-o", "json")
	if err != nil {
		return "", err
	}
	var rel struct {
		Info struct {
			Status string `json:"status"`
		} `json:"info"`
	}
	if err := json.Unmarshal(out, &rel); err != nil {
		return "", fmt.Errorf("helm status: %w: %s", err, out)
	}
	if rel.Info.Status != "deployed" {
		return "", errf("release %s: status %q, want deployed", helmRelease, rel.Info.Status)
	}
	out, err = kubectl(ctx, env, nil, "-n", deployNamespace, "get", "daemonset", daemonSet, "-o", "json")
	if err != nil {
		return "", err
	}
	var ds struct {
		Metadata struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
		Spec struct {
			UpdateStrategy struct {
				RollingUpdate struct {
					MaxSurge       any `json:"maxSurge"`
					MaxUnavailable any `json:"maxUnavailable"`
				} `json:"rollingUpdate"`
			} `json:"updateStrategy"`
			Template struct {
				Spec struct {
					Containers []struct {
						Name  string `json:"name"`
						Ports []any  `json:"ports"`
					} `json:"containers"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
		Status struct {
			Desired int `json:"desiredNumberScheduled"`
			Ready   int `json:"numberReady"`
		} `json:"status"`
	}
	if err := json.Unmarshal(out, &ds); err != nil {
		return "", fmt.Errorf("decode daemonset: %w", err)
	}
	if got := ds.Metadata.Annotations["meta.helm.sh/release-name"]; got != helmRelease {
		return "", errf("DaemonSet %s: release annotation %q, want %q (not installed by helm)", daemonSet, got, helmRelease)
	}
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if fmt.Sprint(ru.MaxSurge) != "10%" || fmt.Sprint(ru.MaxUnavailable) != "0" {
		return "", errf("DaemonSet %s: maxSurge %v, maxUnavailable %v; want 10%% and 0", daemonSet, ru.MaxSurge, ru.MaxUnavailable)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if len(c.Ports) > 0 {
			return "", errf("container %s declares ports %v: a surge pod beside the old one would not schedule", c.Name, c.Ports)
		}
	}
	if ds.Status.Desired == 0 || ds.Status.Ready != ds.Status.Desired {
		return "", errf("DaemonSet %s: %d of %d ready", daemonSet, ds.Status.Ready, ds.Status.Desired)
	}

	nodes := env.Cluster.Nodes()
	for _, n := range nodes {
		f, err := primaryConflist(ctx, env, n)
		if err != nil {
			return "", err
		}
		if e, err := entryOf(f.Data); err != nil || e == nil {
			return "", errf("node %s: %s has no metaconceal entry (%v)", n, f.Path, err)
		}
		if err := poll(ctx, time.Minute, func() error {
			keys, err := nodeTaintKeys(ctx, env, n)
			if err != nil {
				return err
			}
			if slices.Contains(keys, nodegate.TaintKey) {
				return errf("node %s still has the taint %s", n, nodegate.TaintKey)
			}
			return nil
		}); err != nil {
			return "", err
		}
	}
	if err := apply(ctx, env, helmWorkloadManifest, nil); err != nil {
		return "", err
	}
	if _, err := waitPodsReady(ctx, env, WorkloadNamespace, "app=helm-check", 2*time.Minute); err != nil {
		return "", err
	}
	l, err := probeGet(ctx, env, WorkloadNamespace, "helm-check", kubeEnvURL)
	if err != nil {
		return "", err
	}
	if !l.concealed() {
		return "", errf("pod helm-check: kube-env: got %s, want concealed", l)
	}
	// The node agent enters the pod's netns for the self-test. On this test node (a
	// private / mount) it sees only the netns that existed when it started: replace its
	// pod (the DaemonSet makes a new one) so that it sees helm-check's.
	if _, err := kubectl(ctx, env, nil, "-n", deployNamespace, "delete", "pod", "-l", "app.kubernetes.io/name=metaconceal", "--wait=true"); err != nil {
		return "", err
	}
	if err := rolloutStatus(ctx, env, 2*time.Minute); err != nil {
		return "", err
	}
	var metrics []string
	for _, n := range nodes {
		if err := poll(ctx, time.Minute, func() error {
			c, err := guardConditionOf(ctx, env, n)
			if err != nil {
				return err
			}
			if c.Status != "True" {
				return errf("node %s: %s %s (%s)", n, guardCondition, c.Status, c.Message)
			}
			return nil
		}); err != nil {
			return "", err
		}
		// The new agent opens its metrics listener once it runs (the readiness the
		// rollout waited for is the proxy's), and sets some series only after its
		// first self-test: ask until every one is there.
		var found []string
		if err := poll(ctx, time.Minute, func() error {
			found = found[:0]
			body, err := env.Cluster.NodeExec(ctx, n, "curl", "-sS", "--max-time", "5", agentMetrics)
			if err != nil {
				return fmt.Errorf("node %s: %s: %w", n, agentMetrics, err)
			}
			exported := metricrefs.Exported{}
			if err := exported.AddExposition(string(body)); err != nil {
				return err
			}
			for m, labels := range metricrefs.ClusterOnly {
				got, ok := exported[m]
				if !ok {
					return errf("node %s: the node agent exports no %s", n, m)
				}
				for _, l := range labels {
					if !got[l] {
						return errf("node %s: %s has no label %s", n, m, l)
					}
				}
				found = append(found, m)
			}
			return nil
		}); err != nil {
			return "", err
		}
		metrics = append(metrics, found...)
	}
	slices.Sort(metrics)
	return fmt.Sprintf("release %s deployed; DaemonSet %d/%d ready (maxSurge 10%%, maxUnavailable 0, no ports); taint gone, %s True, kube-env concealed; agent exports %s",
		helmRelease, ds.Status.Ready, ds.Status.Desired, guardCondition, strings.Join(slices.Compact(metrics), ", ")), nil
}
