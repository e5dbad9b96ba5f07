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

// HostGuardInstalled returns a probe that reads the IPv4 rules of the netns it runs in
// (iptables-save of backend) and wants the host guard's chains, each jumped to from the
// built-in chains the guard hooks (GuardPresent).
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

// GuardPresent checks an iptables snapshot for the host guard (hostguard.Missing: its
// chains and the jumps into them).
func GuardPresent(snap xtables.Snapshot) error {
	if missing := hostguard.Missing(snap); len(missing) > 0 {
		return fmt.Errorf("host guard not installed: missing %s", strings.Join(missing, ", "))
	}
	return nil
}
