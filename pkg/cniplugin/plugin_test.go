package cniplugin

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// Error paths that return before touching any netns: they need no privileges, and a
// netns path that does not exist proves nothing was attempted there.
func TestVerbErrorsBeforeAnyChange(t *testing.T) {
	t.Parallel()
	stateDir := t.TempDir()
	const prev = `"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}`
	for _, tc := range []struct {
		name, verb, conf string
		code             uint
		mention          string
	}{
		{"bad mode", "ADD", `{"cniVersion":"1.0.0","mode":"SECRET",` + prev + `}`, types.ErrInvalidNetworkConfig, `"SECRET"`},
		{"bad proxy", "ADD", `{"cniVersion":"1.0.0","proxy":"nowhere",` + prev + `}`, types.ErrInvalidNetworkConfig, `"nowhere"`},
		{"bad metadata", "ADD", `{"cniVersion":"1.0.0","metadataAddresses":["x"],` + prev + `}`, types.ErrInvalidNetworkConfig, `"x"`},
		{"no prevResult", "ADD", `{"cniVersion":"1.0.0"}`, types.ErrInvalidNetworkConfig, "must be called as a chained plugin"},
		{"bad prevResult", "ADD", `{"cniVersion":"1.0.0","prevResult":{"cniVersion":"1.0.0","ips":"nope"}}`, types.ErrDecodingFailure, "prevResult"},
		{"check no prevResult", "CHECK", `{"cniVersion":"1.0.0"}`, types.ErrInvalidNetworkConfig, "must be called as a chained plugin"},
		{"del bad config", "DEL", `{"cniVersion":"1.0.0","mode":"SECRET"}`, types.ErrInvalidNetworkConfig, `"SECRET"`},
		{"gc bad config", "GC", `{"cniVersion":"1.1.0","iptablesBackend":"x"}`, types.ErrInvalidNetworkConfig, `"x"`},
		{"status bad config", "STATUS", `{"cniVersion":"1.1.0","proxy":"1.2.3.4"}`, types.ErrInvalidNetworkConfig, `"1.2.3.4"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			p := &Plugin{Stdout: &stdout, Stderr: &stderr}
			conf := strings.Replace(tc.conf, "{", `{"stateDir":"`+stateDir+`",`, 1)
			args := &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", StdinData: []byte(conf)}
			verb := map[string]func(*skel.CmdArgs) error{"ADD": p.Add, "DEL": p.Del, "CHECK": p.Check, "GC": p.GC, "STATUS": p.Status}[tc.verb]
			err := verb(args)
			var cniErr *types.Error
			if !errors.As(err, &cniErr) {
				t.Fatalf("%s returned %v (%T), want a *types.Error", tc.verb, err, err)
			}
			if cniErr.Code != tc.code || !strings.Contains(cniErr.Msg+cniErr.Details, tc.mention) {
				t.Errorf("error %d %q %q, want code %d mentioning %s", cniErr.Code, cniErr.Msg, cniErr.Details, tc.code, tc.mention)
			}
			if stdout.Len() != 0 {
				t.Errorf("a failing verb wrote to stdout: %q", stdout.String())
			}
			if entries, _ := os.ReadDir(stateDir); len(entries) != 0 {
				t.Errorf("state dir not empty after a failed %s: %v", tc.verb, entries)
			}
		})
	}
}

// EXPOSED and UNSPECIFIED pass prevResult through, in the conf's version, without
// entering the netns (which does not exist here), and record the pod as exposed.
func TestAddPassThroughModes(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"EXPOSED", "UNSPECIFIED"} {
		for _, version := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
			stateDir := t.TempDir()
			var stdout, stderr bytes.Buffer
			p := &Plugin{Stdout: &stdout, Stderr: &stderr}
			conf := `{"cniVersion":"` + version + `","name":"n","type":"metaconceal","mode":"` + mode + `","stateDir":"` + stateDir + `",` +
				`"prevResult":{"cniVersion":"` + version + `","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}}`
			args := &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", StdinData: []byte(conf)}
			if err := p.Add(args); err != nil {
				t.Fatalf("%s %s ADD: %v", mode, version, err)
			}
			out := stdout.String()
			if !strings.Contains(out, `"cniVersion": "`+version+`"`) || !strings.Contains(out, "10.1.0.5/24") {
				t.Errorf("%s %s: result not passed through: %s", mode, version, out)
			}
			rec, err := state.Read(stateDir, "c1", "eth0")
			if err != nil || !rec.Exposed || rec.ExposedReason != "mode "+mode || len(rec.IPs) != 1 || rec.IPs[0] != "10.1.0.5" {
				t.Errorf("%s %s: want an exposed record with the pod IP, got %+v, %v", mode, version, rec, err)
			}
			if !strings.Contains(stderr.String(), "nothing installed") {
				t.Errorf("%s: no log line saying so: %q", mode, stderr.String())
			}
			// DEL of the exposed attachment removes the record without entering the netns.
			if err := p.Del(args); err != nil {
				t.Fatalf("%s %s DEL: %v", mode, version, err)
			}
			if entries, _ := os.ReadDir(stateDir); len(entries) != 0 {
				t.Errorf("%s: record left after DEL: %v", mode, entries)
			}
		}
	}
}

func TestExcludedNamespacePassesThrough(t *testing.T) {
	t.Parallel()
	stateDir := t.TempDir()
	var stdout, stderr bytes.Buffer
	p := &Plugin{Stdout: &stdout, Stderr: &stderr}
	conf := `{"cniVersion":"1.0.0","name":"n","type":"metaconceal","excludeNamespaces":["kube-system"],"stateDir":"` + stateDir + `",` +
		`"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}}`
	args := &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", StdinData: []byte(conf),
		Args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"}
	if err := p.Add(args); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if !strings.Contains(stdout.String(), "10.1.0.5/24") {
		t.Errorf("result not passed through: %s", stdout.String())
	}
	if !strings.Contains(stderr.String(), "excludeNamespaces") || !strings.Contains(stderr.String(), "kube-system") {
		t.Errorf("exclusion not logged: %q", stderr.String())
	}
	rec, err := state.Read(stateDir, "c1", "eth0")
	if err != nil || !rec.Exposed || rec.ExposedReason != "excludeNamespaces" || rec.PodNamespace != "kube-system" || rec.PodName != "dns" {
		t.Fatalf("want an exposed record naming the pod, got %+v, %v", rec, err)
	}
	// CHECK of an excluded pod verifies its record only (the netns does not exist here).
	if err := p.Check(args); err != nil {
		t.Errorf("CHECK of excluded pod: %v", err)
	}
	rec.Exposed = false
	if err := state.Write(stateDir, rec); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(args); err == nil {
		t.Error("CHECK accepted an excluded pod whose record says it is concealed")
	}
	if err := state.Remove(stateDir, "c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(args); err == nil {
		t.Error("CHECK accepted an excluded pod without a record")
	}
}

func TestLogFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	logFile := filepath.Join(dir, "plugin.log")
	var stdout, stderr bytes.Buffer
	p := &Plugin{Stdout: &stdout, Stderr: &stderr}
	conf := `{"cniVersion":"1.0.0","mode":"EXPOSED","logFile":"` + logFile + `","stateDir":"` + dir + `","prevResult":{"cniVersion":"1.0.0"}}`
	if err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/x", StdinData: []byte(conf)}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "verb=ADD") || !strings.Contains(stderr.String(), "verb=ADD") {
		t.Errorf("log line missing: file %q stderr %q", data, stderr.String())
	}
	if strings.Contains(stdout.String(), "verb=") {
		t.Errorf("log on stdout: %q", stdout.String())
	}
}

// DEL is host-side only: for a concealed attachment (whose netns path here does not
// even exist), an exposed one, a repeated DEL and an empty CNI_NETNS it removes the
// record, starts no iptables process and says in its log what it did.
func TestDelRemovesRecordOnly(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		rec     *state.Record // written before DEL; nil: none
		garbage bool          // a record file that does not decode instead
		netns   string
		wantLog string
	}{
		{"concealed", &state.Record{Network: "n", ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", IPs: []string{"10.1.0.5"}},
			false, "/nonexistent/netns", "record removed; rules left to the netns"},
		{"exposed", &state.Record{Network: "n", ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", IPs: []string{"10.1.0.5"},
			Exposed: true, ExposedReason: "mode EXPOSED"}, false, "/nonexistent/netns", "record removed; rules left to the netns"},
		{"concealed, empty CNI_NETNS", &state.Record{Network: "n", ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent/netns", IPs: []string{"10.1.0.5"}},
			false, "", "record removed; rules left to the netns"},
		{"no record (a repeated DEL)", nil, false, "/nonexistent/netns", "no state record"},
		{"no record, empty CNI_NETNS", nil, false, "", "no state record"},
		{"unreadable record", nil, true, "/nonexistent/netns", "unreadable state record removed; rules left to the netns"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			stateDir := t.TempDir()
			if tc.rec != nil {
				if err := state.Write(stateDir, *tc.rec); err != nil {
					t.Fatal(err)
				}
			}
			if tc.garbage {
				path, err := state.Path(stateDir, "c1", "eth0")
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte("{not json"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			var stdout, stderr bytes.Buffer
			p := &Plugin{Stdout: &stdout, Stderr: &stderr}
			conf := `{"cniVersion":"1.1.0","name":"n","type":"metaconceal","stateDir":"` + stateDir + `"}`
			if err := p.Del(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: tc.netns, StdinData: []byte(conf)}); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if _, err := state.Read(stateDir, "c1", "eth0"); !errors.Is(err, state.ErrNotFound) {
				t.Errorf("record after DEL: %v", err)
			}
			if entries, err := os.ReadDir(stateDir); err != nil || len(entries) != 0 {
				t.Errorf("state dir after DEL: %v, %v; want empty", entries, err)
			}
			if p.lastRunner != nil {
				t.Errorf("DEL made an iptables runner (%s)", p.lastRunner.CountsString())
			}
			if !strings.Contains(stderr.String(), tc.wantLog) || stdout.Len() != 0 {
				t.Errorf("DEL log %q, stdout %q; want a log line with %q and no stdout", stderr.String(), stdout.String(), tc.wantLog)
			}
		})
	}
}
