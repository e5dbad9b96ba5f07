package cniplugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/redirect"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

var backends = []string{"nft", "legacy"}

// env is one backend's world: a simulated node (for STATUS) and pod netns beside it.
type env struct {
	t        *testing.T
	backend  string
	node     *simnode.Node
	stateDir string
}

// ipv4Rules is how many rules an IPv4 attachment's chains hold with the default
// config: DNAT of ports 80 and 8080 (nat), RETURN of DNS over UDP and TCP and of NTP,
// and the REJECT (filter).
const ipv4Rules = 6

func newEnv(t *testing.T, backend string) *env {
	t.Helper()
	testutil.RequirePrivileged(t, "ip", "iptables-"+backend+"-restore", "iptables-"+backend+"-save", "iptables-"+backend,
		"ip6tables-"+backend+"-restore", "ip6tables-"+backend+"-save", "ip6tables-"+backend)
	node, err := simnode.New("mc-plugin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("close simulated node: %v", err)
		}
	})
	return &env{t: t, backend: backend, node: node, stateDir: filepath.Join(t.TempDir(), "state")}
}

func (e *env) pod() (name, path string) {
	e.t.Helper()
	name, path, err := e.node.NewPodNS("mc-pod")
	if err != nil {
		e.t.Fatal(err)
	}
	return name, path
}

// conf renders the plugin's stdin: extra keys override the defaults; ips become
// prevResult (an empty list still makes a prevResult).
func (e *env) conf(extra map[string]any, ips ...string) []byte {
	e.t.Helper()
	c := map[string]any{"cniVersion": "1.1.0", "name": "test", "type": "metaconceal",
		"stateDir": e.stateDir, "iptablesBackend": e.backend}
	var ipList []map[string]any
	for _, ip := range ips {
		ipList = append(ipList, map[string]any{"address": ip, "interface": 0})
	}
	c["prevResult"] = map[string]any{"cniVersion": "1.1.0",
		"interfaces": []map[string]any{{"name": "eth0", "sandbox": "/x"}}, "ips": ipList}
	for k, v := range extra {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	data, err := json.Marshal(c)
	if err != nil {
		e.t.Fatal(err)
	}
	return data
}

func args(cid, ifname, netns string, conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: cid, IfName: ifname, Netns: netns, StdinData: conf,
		Args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_UID=uid-1"}
}

func (e *env) save(podName string, family xtables.Family) string {
	e.t.Helper()
	prog := "iptables-" + e.backend + "-save"
	if family == xtables.IPv6 {
		prog = "ip6tables-" + e.backend + "-save"
	}
	out, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, prog)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func chainOf(cid, ifname string) string {
	return redirect.Attachment{ContainerID: cid, IfName: ifname}.Chain()
}

// run calls a verb and returns its stdout.
func run(t *testing.T, verb func(*Plugin) func(*skel.CmdArgs) error, a *skel.CmdArgs) (string, *Plugin, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	p := &Plugin{Stdout: &stdout, Stderr: &stderr}
	err := verb(p)(a)
	t.Logf("plugin log: %s", strings.TrimSpace(stderr.String()))
	return stdout.String(), p, err
}

func add(p *Plugin) func(*skel.CmdArgs) error    { return p.Add }
func del(p *Plugin) func(*skel.CmdArgs) error    { return p.Del }
func check(p *Plugin) func(*skel.CmdArgs) error  { return p.Check }
func gc(p *Plugin) func(*skel.CmdArgs) error     { return p.GC }
func status(p *Plugin) func(*skel.CmdArgs) error { return p.Status }

// The life of one attachment: ADD installs rules and record at the cost of one
// process, ADD again leaves one set, CHECK passes and then catches a deleted rule;
// DEL removes the record without starting a process and leaves the rules to the
// netns, a second DEL succeeds, and an ADD on the netns that still holds the rules
// reconciles them to one set that CHECK passes.
func TestAttachmentLifecycle(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			conf := e.conf(nil, "10.22.0.5/24")
			a := args("c-life", "eth0", podPath, conf)
			chain := chainOf("c-life", "eth0")

			out, p, err := run(t, add, a)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if got := p.lastRunner.Counts(); got["iptables-"+backend+"-restore"] != 1 || p.lastRunner.Total() != 1 {
				t.Errorf("ADD ran %v, want exactly one iptables-restore", got)
			}
			var res map[string]any
			if err := json.Unmarshal([]byte(out), &res); err != nil || !strings.Contains(out, "10.22.0.5/24") || res["cniVersion"] != "1.1.0" {
				t.Errorf("ADD result is not prevResult: %q (%v)", out, err)
			}
			saved := e.save(podName, xtables.IPv4)
			for want, n := range map[string]int{
				"-A OUTPUT -m comment --comment \"metaconceal c-life eth0\" -j " + chain:                                       2, // nat and filter
				"-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988": 1,
				"-A " + chain + " -d 169.254.169.254/32 -j REJECT --reject-with icmp-port-unreachable":                         1,
			} {
				if strings.Count(saved, want) != n {
					t.Errorf("after ADD want %d times %q in:\n%s", n, want, saved)
				}
			}
			if v6 := e.save(podName, xtables.IPv6); strings.Contains(v6, redirect.ChainPrefix) {
				t.Errorf("IPv6 rules for a pod without IPv6:\n%s", v6)
			}
			rec, err := state.Read(e.stateDir, "c-life", "eth0")
			if err != nil {
				t.Fatalf("record: %v", err)
			}
			want := state.Record{Network: "test", ContainerID: "c-life", IfName: "eth0", Netns: podPath, IPs: []string{"10.22.0.5"},
				PodNamespace: "team-a", PodName: "web-0", PodUID: "uid-1"}
			if !rec.Equal(want) {
				t.Errorf("record %+v, want %+v", rec, want)
			}

			if _, p, err := run(t, add, a); err != nil {
				t.Fatalf("second ADD: %v", err)
			} else if p.lastRunner.Total() != 2 {
				t.Errorf("second ADD ran %s, want iptables-save + one reconciling iptables-restore", p.lastRunner.CountsString())
			}
			if again := e.save(podName, xtables.IPv4); strings.Count(again, "-j "+chain) != 2 || strings.Count(again, "-A "+chain) != ipv4Rules {
				t.Errorf("after ADD twice want one jump per table and %d rules in the chains:\n%s", ipv4Rules, again)
			}

			if _, _, err := run(t, check, a); err != nil {
				t.Errorf("CHECK after ADD: %v", err)
			}
			if _, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, "iptables-"+backend,
				"-t", "nat", "-D", chain, "-d", "169.254.169.254/32", "-p", "tcp", "-m", "tcp", "--dport", "80",
				"-j", "DNAT", "--to-destination", "169.254.169.252:988"); err != nil {
				t.Fatal(err)
			}
			_, _, err = run(t, check, a)
			if err == nil || !strings.Contains(fmt.Sprint(err), "nat table") {
				t.Errorf("CHECK after deleting the DNAT rule = %v, want an error naming the nat table", err)
			}
			// CHECK also catches a missing record, and one that differs.
			other := args("c-life", "eth0", podPath, e.conf(nil, "10.22.0.6/24"))
			if _, _, err := run(t, add, other); err != nil { // restores the rules, records .6
				t.Fatal(err)
			}
			if _, _, err := run(t, check, a); err == nil || !strings.Contains(fmt.Sprint(err), "record") {
				t.Errorf("CHECK with a record of another IP = %v, want a record error", err)
			}

			_, p, err = run(t, del, a)
			if err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if n := processes(p); n != 0 {
				t.Errorf("DEL started %d iptables process(es), want none", n)
			}
			if left := e.save(podName, xtables.IPv4); strings.Count(left, "-j "+chain) != 2 || strings.Count(left, "-A "+chain) != ipv4Rules {
				t.Errorf("after DEL want the rules left to the netns (one jump per table, %d rules):\n%s", ipv4Rules, left)
			}
			if _, err := state.Read(e.stateDir, "c-life", "eth0"); !errors.Is(err, state.ErrNotFound) {
				t.Errorf("record after DEL: %v", err)
			}
			if _, _, err := run(t, check, a); err == nil || !strings.Contains(fmt.Sprint(err), "record") {
				t.Errorf("CHECK after DEL = %v, want a missing-record error", err)
			}
			if _, p, err := run(t, del, a); err != nil {
				t.Errorf("second DEL: %v", err)
			} else if n := processes(p); n != 0 {
				t.Errorf("second DEL started %d iptables process(es), want none", n)
			}

			// ADD on the netns that still holds the rules: no record, so the -N fast
			// path is tried, fails on the existing chains, and a snapshot reconciles.
			if _, p, err := run(t, add, a); err != nil {
				t.Fatalf("ADD after DEL: %v", err)
			} else if got := p.lastRunner.Counts(); got["iptables-"+backend+"-save"] != 1 || got["iptables-"+backend+"-restore"] != 2 {
				t.Errorf("ADD after DEL ran %v, want the failed -N restore, one iptables-save and one reconciling restore", got)
			}
			if again := e.save(podName, xtables.IPv4); strings.Count(again, "-j "+chain) != 2 || strings.Count(again, "-A "+chain) != ipv4Rules {
				t.Errorf("after ADD on the rules DEL left, want one jump per table and %d rules in the chains:\n%s", ipv4Rules, again)
			}
			if _, _, err := run(t, check, a); err != nil {
				t.Errorf("CHECK after DEL and ADD: %v", err)
			}
		})
	}
}

// Two interfaces of one pod are two attachments: DEL of one removes only its record;
// the other stays whole (record, rules, CHECK).
func TestTwoAttachmentsOneNetns(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			a0 := args("c-two", "eth0", podPath, e.conf(nil, "10.22.0.7/24"))
			a1 := args("c-two", "net1", podPath, e.conf(nil, "10.23.0.7/24"))
			for _, a := range []*skel.CmdArgs{a0, a1} {
				if _, _, err := run(t, add, a); err != nil {
					t.Fatalf("ADD %s: %v", a.IfName, err)
				}
			}
			if _, _, err := run(t, del, a0); err != nil {
				t.Fatalf("DEL eth0: %v", err)
			}
			saved := e.save(podName, xtables.IPv4)
			if strings.Count(saved, "-A "+chainOf("c-two", "eth0")) != ipv4Rules {
				t.Errorf("eth0 rules not left to the netns by its DEL:\n%s", saved)
			}
			if strings.Count(saved, "-A "+chainOf("c-two", "net1")) != ipv4Rules {
				t.Errorf("net1 rules gone with eth0's DEL:\n%s", saved)
			}
			if _, err := state.Read(e.stateDir, "c-two", "eth0"); !errors.Is(err, state.ErrNotFound) {
				t.Errorf("eth0 record after its DEL: %v", err)
			}
			if _, err := state.Read(e.stateDir, "c-two", "net1"); err != nil {
				t.Errorf("net1 record gone with eth0's DEL: %v", err)
			}
			if _, _, err := run(t, check, a1); err != nil {
				t.Errorf("CHECK net1: %v", err)
			}
			if _, _, err := run(t, del, a1); err != nil {
				t.Fatalf("DEL net1: %v", err)
			}
		})
	}
}

// IPv6 rules come only with an IPv6 pod address and an IPv6 metadata address: DNAT
// to proxy6 when set, otherwise reject.
func TestIPv6(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			extra := map[string]any{"metadataAddresses": []string{"169.254.169.254", "fd20:ce::254"}, "proxy6": "[fd20:ce::252]:988"}
			a := args("c-v6", "eth0", podPath, e.conf(extra, "10.22.0.8/24", "fd00:22::8/64"))
			if _, p, err := run(t, add, a); err != nil {
				t.Fatalf("ADD: %v", err)
			} else if p.lastRunner.Total() != 2 {
				t.Errorf("dual-stack ADD ran %s, want one restore per family", p.lastRunner.CountsString())
			}
			chain := chainOf("c-v6", "eth0")
			v6 := e.save(podName, xtables.IPv6)
			for _, want := range []string{
				"-A " + chain + " -d fd20:ce::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd20:ce::252]:988",
				"-A " + chain + " -d fd20:ce::254/128 -j REJECT --reject-with icmp6-port-unreachable",
			} {
				if !strings.Contains(v6, want) {
					t.Errorf("want %q in:\n%s", want, v6)
				}
			}
			if strings.Contains(e.save(podName, xtables.IPv4), "fd20") {
				t.Errorf("IPv6 address in IPv4 rules")
			}
			if _, _, err := run(t, check, a); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			if _, _, err := run(t, del, a); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if left := e.save(podName, xtables.IPv6); strings.Count(left, "-A "+chain) != strings.Count(v6, "-A "+chain) {
				t.Errorf("DEL changed the IPv6 rules in the netns:\nbefore:\n%s\nafter:\n%s", v6, left)
			}

			// Without proxy6, IPv6 metadata traffic is only rejected (no nat chain).
			delete(extra, "proxy6")
			b := args("c-v6b", "eth0", podPath, e.conf(extra, "fd00:22::9/64"))
			if _, _, err := run(t, add, b); err != nil {
				t.Fatalf("ADD without proxy6: %v", err)
			}
			v6 = e.save(podName, xtables.IPv6)
			chainB := chainOf("c-v6b", "eth0")
			// (c-v6's rules, DNAT included, stay in this netns: its DEL left them.)
			if !strings.Contains(v6, "-A "+chainB+" -d fd20:ce::254/128 -j REJECT") || strings.Contains(v6, "-A "+chainB+" -d fd20:ce::254/128 -p tcp -m tcp --dport 80 -j DNAT") ||
				strings.Count(v6, "-j "+chainB) != 1 {
				t.Errorf("without proxy6 want only a REJECT (filter only) for %s:\n%s", chainB, v6)
			}
			if _, _, err := run(t, check, b); err != nil {
				t.Errorf("CHECK without proxy6: %v", err)
			}
			if _, _, err := run(t, del, b); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if recs, err := state.List(e.stateDir); err != nil || len(recs) != 0 {
				t.Errorf("records after both DELs: %+v, %v", recs, err)
			}
		})
	}
}

// DEL succeeds when the netns is gone, when CNI_NETNS is empty, and removes the record,
// without starting a process.
func TestDelWithoutNetns(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			a := args("c-gone", "eth0", podPath, e.conf(nil, "10.22.0.9/24"))
			if _, _, err := run(t, add, a); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if err := simnode.DeleteNetns(podName); err != nil {
				t.Fatal(err)
			}
			if _, p, err := run(t, del, a); err != nil {
				t.Errorf("DEL with the netns gone: %v", err)
			} else if n := processes(p); n != 0 {
				t.Errorf("DEL with the netns gone started %d iptables process(es)", n)
			}
			if _, err := state.Read(e.stateDir, "c-gone", "eth0"); !errors.Is(err, state.ErrNotFound) {
				t.Errorf("record after DEL: %v", err)
			}
			empty := args("c-gone", "eth0", "", e.conf(nil))
			if _, _, err := run(t, del, empty); err != nil {
				t.Errorf("DEL with empty CNI_NETNS: %v", err)
			}
		})
	}
}

// A record that cannot be written rolls the rules back: nothing is left half-applied.
func TestAddRollsBackWhenRecordFails(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			blocker := filepath.Join(t.TempDir(), "not-a-dir")
			if err := os.WriteFile(blocker, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			a := args("c-rb", "eth0", podPath, e.conf(map[string]any{"stateDir": filepath.Join(blocker, "state")}, "10.22.0.10/24"))
			out, _, err := run(t, add, a)
			var cniErr *types.Error
			if !errors.As(err, &cniErr) || cniErr.Code != types.ErrIOFailure {
				t.Fatalf("ADD with an unwritable stateDir = %v, want a code-%d error", err, types.ErrIOFailure)
			}
			if out != "" {
				t.Errorf("failed ADD printed a result: %q", out)
			}
			if left := e.save(podName, xtables.IPv4); strings.Contains(left, "METACONCEAL") {
				t.Errorf("rules left after a failed ADD:\n%s", left)
			}
		})
	}
}

// When the IPv6 rules fail after the IPv4 ones went in, the IPv4 ones are rolled back
// and no record is written: a failed ADD leaves nothing behind.
func TestAddRollsBackWhenIPv6Fails(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			podName, podPath := e.pod()
			a := args("c-rb6", "eth0", podPath, e.conf(map[string]any{"metadataAddresses": []string{"169.254.169.254", "fd20:ce::254"}},
				"10.22.0.14/24", "fd00:22::14/64"))
			var stdout, stderr bytes.Buffer
			p := &Plugin{Stdout: &stdout, Stderr: &stderr, runnerHook: func(r *xtables.Runner) {
				r.SetTools(xtables.IPv6, xtables.Tools{Restore: "/bin/false", Save: "/bin/false", Iptables: "/bin/false"})
			}}
			err := p.Add(a)
			t.Logf("plugin log: %s", stderr.String())
			if err == nil || !strings.Contains(err.Error(), "IPv6") {
				t.Fatalf("ADD with failing ip6tables = %v, want an error naming IPv6", err)
			}
			if stdout.Len() != 0 {
				t.Errorf("failed ADD printed a result: %q", stdout.String())
			}
			if left := e.save(podName, xtables.IPv4); strings.Contains(left, "METACONCEAL") {
				t.Errorf("IPv4 rules left after the IPv6 failure:\n%s", left)
			}
			if recs, err := state.List(e.stateDir); err != nil || len(recs) != 0 {
				t.Errorf("records after a failed ADD: %+v, %v", recs, err)
			}
		})
	}
}

// GC removes the records of attachments not listed as valid, also when their netns is
// gone, leaves the rules to the netns like DEL (without starting a process), and keeps
// the valid ones.
func TestGC(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			e := newEnv(t, backend)
			t.Parallel()
			keepName, keepPath := e.pod()
			staleName, stalePath := e.pod()
			goneName, gonePath := e.pod()
			for _, a := range []*skel.CmdArgs{
				args("c-keep", "eth0", keepPath, e.conf(nil, "10.22.0.11/24")),
				args("c-stale", "eth0", stalePath, e.conf(nil, "10.22.0.12/24")),
				args("c-gone", "eth0", gonePath, e.conf(nil, "10.22.0.13/24")),
			} {
				if _, _, err := run(t, add, a); err != nil {
					t.Fatalf("ADD %s: %v", a.ContainerID, err)
				}
			}
			if err := simnode.DeleteNetns(goneName); err != nil {
				t.Fatal(err)
			}
			// Another network sharing the state dir: not this GC's to collect.
			other := state.Record{Network: "other-net", ContainerID: "c-other", IfName: "net1", Netns: gonePath, IPs: []string{"10.99.0.1"}}
			if err := state.Write(e.stateDir, other); err != nil {
				t.Fatal(err)
			}
			gcConf := e.conf(map[string]any{"prevResult": nil,
				"cni.dev/valid-attachments": []map[string]string{{"containerID": "c-keep", "ifname": "eth0"}}})
			if _, p, err := run(t, gc, &skel.CmdArgs{StdinData: gcConf}); err != nil {
				t.Fatalf("GC: %v", err)
			} else if n := processes(p); n != 0 {
				t.Errorf("GC started %d iptables process(es), want none", n)
			}
			recs, err := state.List(e.stateDir)
			if err != nil || len(recs) != 2 || recs[0].ContainerID != "c-keep" || recs[1].ContainerID != "c-other" {
				t.Errorf("records after GC = %+v, %v; want c-keep and the other network's c-other", recs, err)
			}
			if left := e.save(staleName, xtables.IPv4); strings.Count(left, "-A "+chainOf("c-stale", "eth0")) != ipv4Rules {
				t.Errorf("GC touched the stale attachment's rules, which it leaves to the netns:\n%s", left)
			}
			if kept := e.save(keepName, xtables.IPv4); strings.Count(kept, "-A "+chainOf("c-keep", "eth0")) != ipv4Rules {
				t.Errorf("valid attachment's rules gone after GC:\n%s", kept)
			}
		})
	}
}

// STATUS dials the proxy from the netns the plugin runs in: the simulated node.
func TestStatus(t *testing.T) {
	e := newEnv(t, "nft")
	conf := e.conf(map[string]any{"prevResult": nil})
	a := &skel.CmdArgs{StdinData: conf}
	var statusErr error
	err := ns.WithNetNSPath(e.node.Path, func(ns.NetNS) error {
		_, _, statusErr = run(t, status, a)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var cniErr *types.Error
	if !errors.As(statusErr, &cniErr) || cniErr.Code != types.ErrPluginNotAvailable || !strings.Contains(cniErr.Msg, "169.254.169.252:988") {
		t.Errorf("STATUS without a proxy listening = %v, want code %d naming the proxy", statusErr, types.ErrPluginNotAvailable)
	}

	var ln net.Listener
	if err := ns.WithNetNSPath(e.node.Path, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", "169.254.169.252:988")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if err := ns.WithNetNSPath(e.node.Path, func(ns.NetNS) error {
		_, _, statusErr = run(t, status, a)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if statusErr != nil {
		t.Errorf("STATUS with the proxy listening: %v", statusErr)
	}
	exposed := e.conf(map[string]any{"prevResult": nil, "mode": "EXPOSED", "proxy": "10.255.255.1:1"})
	if err := ns.WithNetNSPath(e.node.Path, func(ns.NetNS) error {
		_, _, statusErr = run(t, status, &skel.CmdArgs{StdinData: exposed})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if statusErr != nil {
		t.Errorf("STATUS in EXPOSED mode needs no proxy, got %v", statusErr)
	}
}
