//go:build e2e

package e2e

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// Pod removal (crictl stopp + rmp, as kubelet does): exactly two DELs, the first with
// the netns path, the second with an empty CNI_NETNS, all exiting 0; the state record
// gone; neither DEL ran an iptables process (their log lines say so); and the pod's
// netns, held open past its deletion, still holds exactly the rules of ours it had:
// DEL leaves them to go away with the netns, so nothing alive in it is unconcealed.
func TestPodRemovalDELTwice(t *testing.T) {
	e := shared(t)
	ctx := context.Background()
	p := e.newPod(t, tenantNS, "short-lived", false)
	if _, err := state.Read(e.StateDir, p.id, "eth0"); err != nil {
		t.Fatalf("state record before removal: %v", err)
	}
	// Hold the pod's netns open past the runtime's own deletion of it, to see that
	// DEL left the rules in it.
	held, err := os.Open(p.netns)
	if err != nil {
		t.Fatalf("open pod netns: %v", err)
	}
	defer held.Close()
	before := rulesOfOursIn(t, held)
	if before == "" {
		t.Fatalf("no metaconceal rule found in the pod's netns before removal; the check below would prove nothing")
	}
	if err := e.RT.RemovePod(ctx, p.id); err != nil {
		t.Fatalf("remove pod: %v", err)
	}
	calls := e.cniCallsFor(t, p.id)
	var dels []harness.CNICall
	for _, c := range calls {
		if c.Command == "DEL" {
			dels = append(dels, c)
		}
		if c.RC != "0" {
			t.Errorf("metaconceal %s exited %s", c.Command, c.RC)
		}
	}
	if len(dels) != 2 {
		t.Fatalf("want 2 DEL calls, got %d: %+v", len(dels), calls)
	}
	if dels[0].Netns != p.netns || dels[1].Netns != "" {
		t.Errorf("DEL netns: want %q then empty, got %q then %q", p.netns, dels[0].Netns, dels[1].Netns)
	}
	if _, err := state.Read(e.StateDir, p.id, "eth0"); err == nil {
		t.Errorf("state record still there after removal")
	}
	if rules := rulesOfOursIn(t, held); rules != before {
		t.Errorf("DEL changed the rules in the pod's netns:\nbefore:\n%s\nafter:\n%s", before, rules)
	}
	var delLogs []string
	for _, line := range matchingLines(readFile(t, e.PluginLog), "verb=DEL", "containerID="+p.id) {
		if !strings.Contains(line, "iptables=none") {
			t.Errorf("DEL log line without iptables=none: %s", line)
		}
		delLogs = append(delLogs, line)
	}
	if len(delLogs) != 2 || !strings.Contains(delLogs[0], "record removed; rules left to the netns") || !strings.Contains(delLogs[1], "no state record") {
		t.Errorf("want the DELs' log lines to say record removed, then no record:\n%s", strings.Join(delLogs, "\n"))
	}
	if _, err := os.Stat(p.netns); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox netns %s still there: %v", p.netns, err)
	}
}
