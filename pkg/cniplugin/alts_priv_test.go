package cniplugin

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// ADD installs GCE's port treatment in one iptables-restore per family, chosen by the
// "alts" key; CHECK fails when any rule of it is gone (the DNS pass, the 8080 DNAT);
// ADD after a change of "alts" converges, also after a DEL that left the rules to the
// netns.
func TestALTSTreatment(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			testutil.RequirePrivileged(t, "ip", "iptables-"+backend, "iptables-"+backend+"-restore", "iptables-"+backend+"-save")
			t.Parallel()
			e := newEnv(t, backend)
			podName, podPath := e.pod()
			chain := chainOf("c-alts", "eth0")
			relay := args("c-alts", "eth0", podPath, e.conf(nil, "10.22.0.7/24"))
			reject := args("c-alts", "eth0", podPath, e.conf(map[string]any{"alts": "reject"}, "10.22.0.7/24"))
			dnat8080 := "-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 169.254.169.252:987"
			passDNS := "-A " + chain + " -d 169.254.169.254/32 -p udp -m udp --dport 53 -j RETURN"

			_, p, err := run(t, add, relay)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if got := p.lastRunner.CountsString(); got != "iptables-"+backend+"-restore=1" {
				t.Errorf("ADD ran %s, want one iptables-restore", got)
			}
			saved := e.save(podName, xtables.IPv4)
			for _, want := range []string{dnat8080, passDNS,
				"-A " + chain + " -d 169.254.169.254/32 -p tcp -m tcp --dport 53 -j RETURN",
				"-A " + chain + " -d 169.254.169.254/32 -p udp -m udp --dport 123 -j RETURN"} {
				if strings.Count(saved, want) != 1 {
					t.Errorf("after ADD want once %q:\n%s", want, saved)
				}
			}
			if _, _, err := run(t, check, relay); err != nil {
				t.Fatalf("CHECK after ADD: %v", err)
			}
			for _, tc := range []struct {
				table string
				rule  []string
			}{
				{"filter", []string{"-d", "169.254.169.254/32", "-p", "udp", "-m", "udp", "--dport", "53", "-j", "RETURN"}},
				{"nat", []string{"-d", "169.254.169.254/32", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "169.254.169.252:987"}},
			} {
				if _, err := simnode.Run(context.Background(), "ip", append([]string{"netns", "exec", podName, "iptables-" + backend, "-t", tc.table, "-D", chain}, tc.rule...)...); err != nil {
					t.Fatal(err)
				}
				if _, _, err := run(t, check, relay); err == nil || !strings.Contains(fmt.Sprint(err), tc.table+" table") {
					t.Errorf("CHECK without %v = %v, want an error naming the %s table", tc.rule, err, tc.table)
				}
				if _, _, err := run(t, add, relay); err != nil { // repairs
					t.Fatal(err)
				}
			}

			// alts: reject: no 8080 DNAT; CHECK of the old config fails, of the new passes.
			if _, _, err := run(t, add, reject); err != nil {
				t.Fatalf("ADD with alts reject: %v", err)
			}
			saved = e.save(podName, xtables.IPv4)
			if strings.Contains(saved, "--dport 8080") || strings.Count(saved, passDNS) != 1 {
				t.Errorf("alts reject: want no 8080 rule and the DNS pass:\n%s", saved)
			}
			if _, _, err := run(t, check, reject); err != nil {
				t.Errorf("CHECK alts reject: %v", err)
			}
			if _, _, err := run(t, check, relay); err == nil {
				t.Error("CHECK of the relay config passed on the reject rules")
			}

			// DEL leaves the reject rules to the netns; an ADD of the relay config there
			// (no record any more) converges to the relay rules.
			if _, _, err := run(t, del, reject); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if saved := e.save(podName, xtables.IPv4); strings.Count(saved, passDNS) != 1 || strings.Contains(saved, "--dport 8080") {
				t.Errorf("DEL changed the reject rules in the netns:\n%s", saved)
			}
			if _, _, err := run(t, add, relay); err != nil {
				t.Fatalf("ADD with alts relay after DEL: %v", err)
			}
			if saved := e.save(podName, xtables.IPv4); strings.Count(saved, dnat8080) != 1 || strings.Count(saved, passDNS) != 1 {
				t.Errorf("ADD after DEL did not converge to the relay rules:\n%s", saved)
			}
			if _, _, err := run(t, check, relay); err != nil {
				t.Errorf("CHECK alts relay after DEL and ADD: %v", err)
			}
		})
	}
}
