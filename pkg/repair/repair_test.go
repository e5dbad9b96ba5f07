package repair

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/metaconceal/metaconceal/pkg/conflist"
	"github.com/metaconceal/metaconceal/pkg/netconf"
	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestUnprotected(t *testing.T) {
	t.Parallel()
	sbs := []Sandbox{
		{ID: "a", Ready: true},                    // recorded
		{ID: "b", Ready: true},                    // no record: unprotected
		{ID: "c", Ready: true, HostNetwork: true}, // hostNetwork: CNI never ran
		{ID: "d", Ready: false},                   // not ready
		{ID: "e", Ready: true},                    // recorded under another ifname
	}
	recs := []state.Record{{ContainerID: "a", IfName: "eth0"}, {ContainerID: "e", IfName: "net1"}, {ContainerID: "gone", IfName: "eth0"}}
	got := Unprotected(sbs, recs)
	if len(got) != 1 || got[0].ID != "b" {
		t.Errorf("Unprotected = %+v, want only b", got)
	}
}

func TestParseMode(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"repair", "report", "off"} {
		if m, err := ParseMode(s); err != nil || string(m) != s {
			t.Errorf("ParseMode(%q) = %q, %v", s, m, err)
		}
	}
	for _, s := range []string{"", "Repair", "on"} {
		if _, err := ParseMode(s); err == nil {
			t.Errorf("ParseMode(%q): want an error", s)
		}
	}
}

// TestPluginConfStdin checks that the stdin a repair hands the plugin parses with the
// plugin's own parser in every spec version, with prevResult carrying the pod's IPs.
func TestPluginConfStdin(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			list := `{"cniVersion":"` + v + `","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0"}]}`
			if err := os.WriteFile(filepath.Join(dir, "10-net.conflist"), []byte(list), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := LoadPluginConf(dir); err == nil || !strings.Contains(err.Error(), ErrNoEntry.Error()) {
				t.Fatalf("LoadPluginConf without an entry: %v, want ErrNoEntry", err)
			}
			if _, err := conflist.Install(dir, conflist.Entry{Mode: "SECURE", Proxy: "169.254.169.252:988", ExcludeNamespaces: []string{"kube-system"}}); err != nil {
				t.Fatal(err)
			}
			pc, err := LoadPluginConf(dir)
			if err != nil {
				t.Fatal(err)
			}
			if pc.Network != "podnet" || pc.CNIVersion != v || !pc.Conf.Excluded("kube-system") || pc.Conf.StateDir != state.DefaultDir {
				t.Errorf("plugin conf %+v / %+v", pc, pc.Conf)
			}
			args, err := pc.AddArgs(Sandbox{ID: "sb1", Namespace: "shop", Name: "web", UID: "u-1", Netns: "/run/netns/x", IPs: []string{"10.0.0.5", "fd00::5"}}, DefaultIfName, "veth123")
			if err != nil {
				t.Fatal(err)
			}
			conf, err := netconf.Parse(args.StdinData)
			if err != nil {
				t.Fatalf("the plugin rejects the repair's stdin: %v\n%s", err, args.StdinData)
			}
			if err := version.ParsePrevResult(&conf.NetConf); err != nil {
				t.Fatal(err)
			}
			res, err := current.NewResultFromResult(conf.PrevResult)
			if err != nil {
				t.Fatal(err)
			}
			var ips []string
			for _, ip := range res.IPs {
				ips = append(ips, ip.Address.IP.String())
			}
			if strings.Join(ips, ",") != "10.0.0.5,fd00::5" {
				t.Errorf("prevResult IPs %v", ips)
			}
			pod := netconf.ParsePodArgs(args.Args)
			if pod.Namespace != "shop" || pod.Name != "web" || pod.UID != "u-1" || args.ContainerID != "sb1" || args.IfName != "eth0" || args.Netns != "/run/netns/x" {
				t.Errorf("args %+v, pod %+v", args, pod)
			}
			var raw map[string]json.RawMessage
			if err := json.Unmarshal(args.StdinData, &raw); err != nil {
				t.Fatal(err)
			}
			if string(raw["name"]) != `"podnet"` || string(raw["type"]) != `"metaconceal"` {
				t.Errorf("stdin name %s type %s", raw["name"], raw["type"])
			}
		})
	}
}

func TestAddArgsRejectsSeparators(t *testing.T) {
	t.Parallel()
	pc := &PluginConf{Network: "n", CNIVersion: "1.0.0", entry: map[string]any{"type": "metaconceal"}}
	if _, err := pc.AddArgs(Sandbox{ID: "x", Namespace: "a;K8S_POD_NAMESPACE=kube-system", Name: "b", IPs: []string{"10.0.0.1"}}, "eth0", ""); err == nil {
		t.Error("a namespace that would inject CNI_ARGS keys: want an error")
	}
}

// failingSandboxes is a runtime that cannot list (a CRI socket that is down).
type failingSandboxes struct{ err error }

func (f failingSandboxes) ReadySandboxes(context.Context) ([]Sandbox, error) { return nil, f.err }
func (f failingSandboxes) Sandbox(context.Context, string) (Sandbox, bool, error) {
	return Sandbox{}, false, f.err
}

// TestIncompleteScanKeepsGauge: a scan that could not list the sandboxes must not
// report zero unprotected pods, nor move the last-scan time the stall alert watches.
func TestIncompleteScanKeepsGauge(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	m.unprotected.Set(3) // what the last complete scan found
	r, err := New(Config{Mode: ModeReport, Sandboxes: failingSandboxes{errors.New("connection refused")}, ConfDir: t.TempDir(), StateDir: t.TempDir(), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Scan(context.Background()); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("scan: %v, want the CRI error", err)
	}
	if got := testutil.ToFloat64(m.unprotected); got != 3 {
		t.Errorf("unprotected gauge %v after a failed scan, want the last complete value 3", got)
	}
	if got := testutil.ToFloat64(m.lastScan); got != 0 {
		t.Errorf("last scan time %v after a failed scan, want unset", got)
	}
	if got := testutil.ToFloat64(m.scanErrors); got != 1 {
		t.Errorf("scan errors %v, want 1", got)
	}
}
