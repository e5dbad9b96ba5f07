package cni

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// A process still running in a pod's netns after the plugin's DEL keeps getting the
// concealed answer for kube-env. libcni runs a chain's DEL in reverse order, so
// metaconceal's DEL comes before the main plugin's: the pod keeps its interface for as
// long as that DEL keeps failing (the runtime retries it), and for good when a runtime
// tears networking down before the pod's last process exits or the CNI configuration
// changes under a live pod. This is that pod: bridge + metaconceal through cnitool,
// then metaconceal's DEL alone, exactly as the runtime calls it, while a curl started
// before waits in the netns.
//
// The proxy runs with --host-guard=false here (gceWorld) and the test installs no
// guard, so only the pod's own rules can conceal anything: the control at the end
// flushes them and the same netns reads kube-env. A DEL that removed the rules (as it
// did before issue 18) sends the waiting curl straight to the metadata server.
func TestProcessAfterDELStaysConcealed(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-save", "iptables-restore", "nsenter", "curl")
	w := newGCEWorld(t)
	w.conflistGCE("mc-del", "mcdbr0", "10.98.5.0/24", map[string]any{})
	podName, podPath, err := w.node.NewPodNS("mc-del-pod")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.add(t, "mc-del", podPath); err != nil {
		t.Fatalf("cnitool add: %v", err)
	}
	requireConcealed(t, "pod before DEL", podPath)
	recs, err := state.List(w.stateDir)
	if err != nil || len(recs) != 1 {
		t.Fatalf("state records after add: %+v, %v; want one", recs, err)
	}
	rec := recs[0]

	// The process that outlives DEL: a shell in the pod's netns (entered from the node
	// netns, so it can never be the machine's own) that waits for a line on stdin, then
	// asks for kube-env.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	proc := w.node.Command(ctx, "nsenter", "--net="+podPath, "sh", "-c",
		`read -r go && exec curl -sS --max-time 5 -H 'Metadata-Flavor: Google' -w '\n%{http_code}' "$1"`, "sh", kubeEnvURL)
	start, err := proc.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	proc.Stdout, proc.Stderr = &out, &errOut
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	t.Cleanup(func() {
		if !waited {
			_ = proc.Process.Kill()
			_ = proc.Wait()
		}
	})

	logs, err := w.pluginDEL(ctx, "mc-del", rec)
	if err != nil {
		t.Fatalf("metaconceal DEL: %v\n%s", err, logs)
	}
	if !strings.Contains(logs, "record removed; rules left to the netns") {
		t.Errorf("DEL log does not say what it did:\n%s", logs)
	}
	if _, err := state.Read(w.stateDir, rec.ContainerID, rec.IfName); err == nil {
		t.Errorf("state record still there after DEL")
	}
	if saved := iptablesSaveAll(t, podName); strings.Count(saved, "-j METACONCEAL-") != 2 {
		t.Errorf("want the pod's rules left in its netns after DEL:\n%s", saved)
	}

	if _, err := io.WriteString(start, "go\n"); err != nil {
		t.Fatal(err)
	}
	_ = start.Close()
	err = proc.Wait()
	waited = true
	body, code := out.String(), "" // curl -w puts the status on a line of its own, last
	if i := strings.LastIndex(body, "\n"); i >= 0 {
		body, code = body[:i], body[i+1:]
	}
	t.Logf("the pod's process after DEL: %s %q (%v, stderr %q)", code, body, err, errOut.String())
	if strings.Contains(out.String(), fakegce.KubeEnvMarker) {
		t.Fatalf("kube-env LEAKED to the pod's process after DEL: %s", out.String())
	}
	if err != nil || code != fmt.Sprint(http.StatusForbidden) || body != policy.ConcealedBody {
		t.Errorf("the pod's process after DEL got %s %q (%v); want 403 %q from the proxy", code, body, err, policy.ConcealedBody)
	}

	// Control: without its rules the same netns reads kube-env, so nothing but the
	// rules DEL left concealed it above.
	harness.FlushAll(ctx, podPath)
	if status, got, err := metadataGet(podPath, kubeEnvURL); err != nil || status != http.StatusOK || !strings.Contains(got, fakegce.KubeEnvMarker) {
		t.Errorf("control: with the pod's rules flushed, kube-env = %d %q %v; want 200 with the secret (no host guard in this world)", status, got, err)
	}
}

// pluginDEL runs the metaconceal binary's DEL for rec inside the node netns, with the
// network's name and state dir, as libcni calls it first in a chain's DEL; it returns
// the plugin's log.
func (w *gceWorld) pluginDEL(ctx context.Context, network string, rec state.Record) (string, error) {
	conf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":%q,"type":"metaconceal","stateDir":%q}`, network, w.stateDir)
	bin := filepath.Join(strings.Split(cniPath, ":")[0], "metaconceal")
	cmd := w.node.Command(ctx, "env", "CNI_COMMAND=DEL", "CNI_CONTAINERID="+rec.ContainerID, "CNI_IFNAME="+rec.IfName,
		"CNI_NETNS="+rec.Netns, "CNI_PATH="+cniPath, "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE="+rec.PodNamespace+";K8S_POD_NAME="+rec.PodName, bin)
	var stderr bytes.Buffer
	cmd.Stdin, cmd.Stderr = strings.NewReader(conf), &stderr
	if out, err := cmd.Output(); err != nil {
		return stderr.String(), fmt.Errorf("%w: stdout %s", err, out)
	}
	return stderr.String(), nil
}
