package nodegate

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// HTTPReady returns a probe that wants 200 from url (the proxy's /readyz).
func HTTPReady(url string) func(ctx context.Context) error {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil}}
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("readiness request %s: %w", url, err)
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("GET %s: %w", url, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512)) // for the message only
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
		}
		return nil
	}
}

// guardJumps are the built-in chains that must jump to the host guard's chain, by
// table (see pkg/hostguard).
var guardJumps = map[string][]string{"nat": {"PREROUTING"}, "filter": {"FORWARD", "INPUT"}}

// HostGuardInstalled returns a probe that reads the IPv4 rules of the netns it runs in
// (iptables-save of backend) and wants the host guard's chain in nat and filter, each
// jumped to from the built-in chains the guard hooks.
func HostGuardInstalled(backend xtables.Backend) func(ctx context.Context) error {
	runner := xtables.NewRunner(backend)
	return func(ctx context.Context) error {
		snap, err := runner.Snapshot(ctx, xtables.IPv4)
		if err != nil {
			return fmt.Errorf("read host iptables rules: %w", err)
		}
		return GuardPresent(snap)
	}
}

// GuardPresent checks an iptables snapshot for the host guard.
func GuardPresent(snap xtables.Snapshot) error {
	var missing []string
	for _, table := range []string{"nat", "filter"} {
		if !snap.HasChain(table, hostguard.Chain) {
			missing = append(missing, table+" chain "+hostguard.Chain)
			continue
		}
		for _, builtin := range guardJumps[table] {
			found := false
			for _, j := range snap.Jumps(table, hostguard.Chain) {
				if strings.HasPrefix(j, builtin+" ") {
					found = true
				}
			}
			if !found {
				missing = append(missing, table+" "+builtin+" jump to "+hostguard.Chain)
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("host guard not installed: missing %s", strings.Join(missing, ", "))
	}
	return nil
}
