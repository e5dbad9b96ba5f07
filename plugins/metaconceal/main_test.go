package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/cniplugin"
)

// The built binary speaks CNI through skel: VERSION lists 0.3.0..1.1.0, and ADD, CHECK,
// DEL (record removed, rules left to the netns) and STATUS work when a runtime runs it
// inside the node netns, stdout carrying only the result or the error JSON.
func TestBinary(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables-restore", "iptables-save", "go")
	bin := filepath.Join(t.TempDir(), "metaconceal")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	node, err := simnode.New("mc-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("close node: %v", err)
		}
	})
	podName, podPath, err := node.NewPodNS("mc-bin-pod")
	if err != nil {
		t.Fatal(err)
	}
	stateDir := t.TempDir()
	conf := `{"cniVersion":"1.1.0","name":"bin","type":"metaconceal","stateDir":"` + stateDir + `",` +
		`"prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"` + podPath + `"}],"ips":[{"address":"10.22.0.5/24","interface":0}]}}`

	invoke := func(command string) (stdout, stderr string, err error) {
		t.Helper()
		cmd := node.Command(context.Background(), "env", "CNI_COMMAND="+command, "CNI_CONTAINERID=bin-c1", "CNI_IFNAME=eth0",
			"CNI_NETNS="+podPath, "CNI_PATH="+filepath.Dir(bin), "CNI_ARGS=K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1", bin)
		var o, e bytes.Buffer
		cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(conf), &o, &e
		err = cmd.Run()
		return o.String(), e.String(), err
	}

	out, _, err := invoke("VERSION")
	if err != nil || !strings.Contains(out, `"supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]`) {
		t.Errorf("VERSION = %q, %v", out, err)
	}
	out, logs, err := invoke("ADD")
	if err != nil {
		t.Fatalf("ADD: %v\nstdout %s\nstderr %s", err, out, logs)
	}
	var res struct {
		CNIVersion string `json:"cniVersion"`
		IPs        []struct{ Address string }
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.CNIVersion != "1.1.0" || len(res.IPs) != 1 || res.IPs[0].Address != "10.22.0.5/24" {
		t.Errorf("ADD stdout is not the prevResult: %q (%v)", out, err)
	}
	if !strings.Contains(logs, "metadata concealed") {
		t.Errorf("ADD did not log on stderr: %q", logs)
	}
	saved, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, "iptables-save")
	if err != nil || !strings.Contains(saved, "DNAT --to-destination 169.254.169.252:988") {
		t.Errorf("no DNAT rule after ADD (%v):\n%s", err, saved)
	}
	if out, logs, err := invoke("CHECK"); err != nil {
		t.Errorf("CHECK: %v\n%s%s", err, out, logs)
	}
	// No proxy listens in this node: STATUS must say so with code 50.
	out, _, err = invoke("STATUS")
	if err == nil || !strings.Contains(out, `"code": 50`) {
		t.Errorf("STATUS without proxy = %q, %v; want a code-50 error", out, err)
	}
	out, logs, err = invoke("DEL")
	if err != nil || out != "" || !strings.Contains(logs, "record removed; rules left to the netns") {
		t.Errorf("DEL: %v, stdout %q\n%s", err, out, logs)
	}
	// DEL removes the record only; the rules go with the netns.
	if entries, err := os.ReadDir(stateDir); err != nil || len(entries) != 0 {
		t.Errorf("state dir after DEL: %v, %v; want empty", entries, err)
	}
	saved, err = simnode.Run(context.Background(), "ip", "netns", "exec", podName, "iptables-save")
	if err != nil || !strings.Contains(saved, "DNAT --to-destination 169.254.169.252:988") {
		t.Errorf("DEL changed the pod's rules (%v):\n%s", err, saved)
	}
}

// TestVersion runs the binary by hand, as `make build` builds it: --version prints the
// build on stdout and exits 0; without CNI_COMMAND and without --version, skel prints
// the about text (with the build) on stderr; skel's VERSION verb still answers JSON,
// --version or not.
func TestVersion(t *testing.T) {
	t.Parallel()
	bin := testutil.BuildVersioned(t, ".", "metaconceal", "1.2.3-test", "abc123")
	run := func(env []string, args ...string) (stdout, stderr string, err error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
		var o, e bytes.Buffer
		cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(`{"cniVersion":"1.1.0"}`), &o, &e
		err = cmd.Run()
		return o.String(), e.String(), err
	}
	want := "metaconceal 1.2.3-test (commit abc123, " + runtime.Version() + ")\n"
	testutil.CheckVersionFlag(t, bin, want)
	if out, logs, err := run(nil); err != nil || out != "" || !strings.Contains(logs, cniplugin.About+"\n"+want) {
		t.Errorf("no CNI_COMMAND: stdout %q, stderr %q, %v; want the about text and the build on stderr, exit 0", out, logs, err)
	}
	for _, args := range [][]string{nil, {"--version"}} {
		out, logs, err := run([]string{"CNI_COMMAND=VERSION"}, args...)
		if err != nil || !strings.Contains(out, `"supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]`) {
			t.Errorf("CNI_COMMAND=VERSION %q: stdout %q, stderr %q, %v; want the JSON", args, out, logs, err)
		}
	}
}
