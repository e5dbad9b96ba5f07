package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// guardTraces returns what of the host guard the node netns holds: rules and labelled
// lo addresses.
func guardTraces(t *testing.T, node *simnode.Node) string {
	t.Helper()
	var traces []string
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := node.Exec(context.Background(), save)
		if err != nil {
			t.Fatalf("%s in the node netns: %v", save, err)
		}
		for l := range strings.SplitSeq(out, "\n") {
			if strings.Contains(l, hostguard.Chain) || strings.Contains(l, hostguard.SpoofChain) || strings.Contains(l, hostguard.AttestChain) {
				traces = append(traces, l)
			}
		}
	}
	out, err := node.Exec(context.Background(), "ip", "addr", "show", "dev", "lo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, hostguard.AddrLabel) {
		traces = append(traces, "lo address labelled "+hostguard.AddrLabel)
	}
	return strings.Join(traces, "\n")
}

// TestBadFlagLeavesNoGuard runs the proxy (host guard on, the default) with one bad
// flag at a time inside a simulated node: each is refused before anything is
// installed. 169.254.169.251 is not on the node's lo, so an installed guard would also
// have left an address behind.
func TestBadFlagLeavesNoGuard(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-save", "iptables-restore", "ip6tables-save")
	t.Parallel()
	node, err := simnode.New("mc-main")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	base := []string{"--listen", "169.254.169.251:988", "--metrics-listen", "", "--state-dir", t.TempDir()}
	missing := filepath.Join(t.TempDir(), "no-such-policy.json")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"upstream not a URL", []string{"--upstream", "169.254.169.254"}, "--upstream"},
		{"upstream with a path", []string{"--upstream", "http://169.254.169.254/computeMetadata/v1/"}, "--upstream"},
		{"upstream port", []string{"--upstream", "http://169.254.169.254:0"}, "--upstream: hostguard: upstream port"},
		{"policy file", []string{"--policy", missing}, "--policy"},
		{"recursive", []string{"--recursive", "sometimes"}, "--recursive"},
		{"metrics listen", []string{"--metrics-listen", "localhost"}, "--metrics-listen"},
		{"metadata addr", []string{"--metadata-addr", "metadata"}, "--metadata-addr"},
		{"backend", []string{"--iptables-backend", "ebpf"}, "backend"},
		{"listen by name", []string{"--listen", "metadata.local:988"}, "--listen"},
		{"guard connection burst", []string{"--guard-conn-burst", "0"}, "--guard-conn-burst"},
		{"guard connection rate", []string{"--guard-conn-rate", "-5"}, "--guard-conn-rate"},
		{"guard reconcile interval", []string{"--guard-reconcile-interval", "1ms"}, "--guard-reconcile-interval"},
	} {
		var stderr bytes.Buffer
		var code int
		err := simnode.In(node.Path, func() error {
			code = run(append(append([]string{}, base...), tc.args...), &stderr)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if code != 1 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit 1 naming %q", tc.name, code, stderr.String(), tc.want)
		}
		if traces := guardTraces(t, node); traces != "" {
			t.Fatalf("%s: the refused run left the host guard behind:\n%s", tc.name, traces)
		}
	}
}

// TestRemoveHostGuardSubcommand installs the guard (with attestation rules) in a
// simulated node and takes it away with `remove-host-guard`, then again with the
// deprecated flag, which still works and says it is deprecated.
func TestRemoveHostGuardSubcommand(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")
	t.Parallel()
	node, err := simnode.New("mc-main")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	flags := []string{"--listen", "169.254.169.251:988", "--log-format", "text"}
	install := func() {
		t.Helper()
		o, err := parseRemoveFlags(flags, os.Stderr)
		if err != nil {
			t.Fatal(err)
		}
		upstream, err := parseUpstream(o.upstream)
		if err != nil {
			t.Fatal(err)
		}
		err = simnode.In(node.Path, func() error {
			cfg, err := guardConfig(o, upstream)
			if err != nil {
				return err
			}
			if err := hostguard.Install(context.Background(), cfg, nil); err != nil {
				return err
			}
			sg, err := hostguard.NewSpoofGuard(cfg, nil)
			if err != nil {
				return err
			}
			return sg.Attest(context.Background(), []state.Record{{ContainerID: "c", IfName: "eth0", IPs: []string{"10.0.0.2"}, HostIf: "lo"}})
		})
		if err != nil {
			t.Fatalf("installing the guard in the node: %v", err)
		}
		if traces := guardTraces(t, node); !strings.Contains(traces, hostguard.SpoofChain) || !strings.Contains(traces, "-s 10.0.0.2/32 -i lo") || !strings.Contains(traces, hostguard.AddrLabel) {
			t.Fatalf("guard not fully installed:\n%s", traces)
		}
	}
	for _, tc := range []struct {
		name, warning string
		args          []string
	}{
		{"subcommand", "", append([]string{"remove-host-guard"}, flags...)},
		{"deprecated flag", "deprecated", append([]string{"--remove-host-guard"}, flags...)},
	} {
		install()
		var stderr bytes.Buffer
		var code int
		if err := simnode.In(node.Path, func() error { code = dispatch(tc.args, os.Stdout, &stderr); return nil }); err != nil {
			t.Fatal(err)
		}
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", tc.name, code, stderr.String())
		}
		if traces := guardTraces(t, node); traces != "" {
			t.Errorf("%s left:\n%s", tc.name, traces)
		}
		if tc.warning != "" && !strings.Contains(stderr.String(), tc.warning) {
			t.Errorf("%s: no %q warning in %q", tc.name, tc.warning, stderr.String())
		}
	}
}
