//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/harness"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// 50 pods added and removed, 8 at a time: every runp succeeds, each pod's kube-env is
// concealed, one ADD and at least one DEL per pod all exiting 0, no xtables-lock
// trouble; afterwards no state record of theirs and the node's rules of ours exactly
// as before. On a node of its own: the node's rules are compared, and the proxy
// changes them for another test's exposed pod (anti-spoofing).
func TestFiftyPodsEightAtATime(t *testing.T) {
	e := setup(t, false)
	ctx := context.Background()
	before := rulesOfOurs(t, e.NS.Path)
	const total, parallel = 50, 8
	ids := make([]string, total)
	ips := make([][]string, total)
	errs := make([]error, total)
	since := e.FakeLogSize()
	// A removal the test did not get to (a failed add, an early end) is the cleanup's.
	t.Cleanup(func() {
		for _, id := range ids {
			if id != "" && e.RT.Known(id) {
				if err := e.RT.RemovePod(context.Background(), id); err != nil {
					t.Errorf("cleanup: remove pod %s: %v", id, err)
				}
			}
		}
	})
	start := time.Now()
	forEach(total, parallel, func(i int) {
		p, err := e.StartPod(ctx, harness.PodSpec{Namespace: tenantNS, Name: fmt.Sprintf("bulk-%02d", i)})
		ids[i], ips[i], errs[i] = p.ID, p.Sandbox.IPs, err
		if err != nil {
			return
		}
		r := harness.MetadataGet(ctx, p.Netns, metadataURL+kubeEnvPath)
		if r.Status != 403 || strings.TrimSuffix(r.Body, "\n") != concealedBody {
			errs[i] = fmt.Errorf("pod bulk-%02d: kube-env not concealed: %s", i, r)
		}
	})
	added := time.Since(start)
	reportErrors(t, "add", errs)
	start = time.Now()
	delErrs := make([]error, total)
	forEach(total, parallel, func(i int) {
		if ids[i] != "" {
			delErrs[i] = e.RT.RemovePod(ctx, ids[i])
		}
	})
	removed := time.Since(start)
	t.Logf("measured: %d pods added (runp + inspectp + one curl each) in %s, removed (stopp + rmp) in %s, %d at a time",
		total, added.Round(time.Millisecond), removed.Round(time.Millisecond), parallel)
	reportErrors(t, "remove", delErrs)
	recs, err := state.List(e.StateDir)
	if err != nil {
		t.Fatalf("list state records: %v", err)
	}
	for _, rec := range recs {
		for _, id := range ids {
			if rec.ContainerID == id {
				t.Errorf("state record of removed pod %s/%s left", rec.PodNamespace, rec.PodName)
			}
		}
	}
	// The attestation rules follow the state dir in the proxy's refresher, after the
	// records are gone (at most one apply plus podindex.MinRefreshGap): wait for it.
	after := rulesOfOurs(t, e.NS.Path)
	for wait := time.Now().Add(10 * time.Second); after != before && time.Now().Before(wait); {
		time.Sleep(100 * time.Millisecond)
		after = rulesOfOurs(t, e.NS.Path)
	}
	if after != before {
		t.Errorf("node rules changed across 50 pods added and removed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	for i, id := range ids {
		if id == "" {
			continue
		}
		var adds, dels int
		for _, c := range e.cniCallsFor(t, id) {
			if c.RC != "0" {
				t.Errorf("bulk-%02d: metaconceal %s exited %s", i, c.Command, c.RC)
			}
			switch c.Command {
			case "ADD":
				adds++
			case "DEL":
				dels++
			}
		}
		if adds != 1 || dels < 1 {
			t.Errorf("bulk-%02d: want 1 ADD and at least 1 DEL, got %d and %d", i, adds, dels)
		}
	}
	if direct := e.directRequests(t, since, slices.Concat(ips...)); len(direct) != 0 {
		t.Errorf("requests from the pods reached the metadata server directly:\n%s", strings.Join(direct, "\n"))
	}
	logs := readFile(t, e.PluginLog) + readFile(t, e.RT.LogPath)
	for _, bad := range []string{"xtables lock", "holding the xtables", "Resource temporarily unavailable"} {
		if strings.Contains(logs, bad) {
			t.Errorf("iptables lock trouble in the logs: %q", bad)
		}
	}
}

func forEach(n, parallel int, fn func(i int)) {
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			fn(i)
		}(i)
	}
	wg.Wait()
}

// reportErrors fails the test with the count of errors and the first three of them.
func reportErrors(t *testing.T, what string, errs []error) {
	t.Helper()
	var failed []error
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) == 0 {
		return
	}
	shown := failed[:min(3, len(failed))]
	t.Errorf("%s: %d of %d failed; first: %v", what, len(failed), len(errs), errors.Join(shown...))
}
