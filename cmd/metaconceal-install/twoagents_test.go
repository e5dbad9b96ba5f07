package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Two node agents at once on one node (a rolling update), whose entries differ (the new
// release excludes another namespace): with the lock, only the first keeps the entry
// while it runs (the entry never flaps to the second's), and the second takes over when
// the first exits.
func TestTwoAgentsOneNode(t *testing.T) {
	t.Parallel()
	bin, confDir, plugin := setup(t, flannel)
	lock := filepath.Join(t.TempDir(), ".node-agent.lock")
	conf := filepath.Join(confDir, "10-flannel.conflist")
	agent := func(ctx context.Context, exclude string, done chan<- int) {
		var stderr bytes.Buffer
		done <- run(ctx, []string{"--cni-bin-dir", bin, "--cni-conf-dir", confDir, "--plugin-binary", plugin,
			"--lock-file", lock, "--exclude-namespaces", exclude, "--resync", "20ms", "--debounce", "5ms", "--log-format", "json"}, &stderr)
	}
	waitFor := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, _ := os.ReadFile(conf)
			if strings.Contains(string(got), what) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the entry never named %s:\n%s", what, got)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	ctxOld, stopOld := context.WithCancel(context.Background())
	ctxNew, stopNew := context.WithCancel(context.Background())
	defer stopOld()
	defer stopNew()
	oldDone, newDone := make(chan int, 1), make(chan int, 1)
	go agent(ctxOld, "old-ns", oldDone)
	waitFor("old-ns")
	go agent(ctxNew, "new-ns", newDone)
	// Fifty resync periods of the old agent with the new one started: the entry stays.
	for range 50 {
		got, _ := os.ReadFile(conf)
		if !strings.Contains(string(got), "old-ns") || strings.Contains(string(got), "new-ns") {
			t.Fatalf("with both agents running the entry changed (flapping):\n%s", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stopOld()
	if code := <-oldDone; code != 0 {
		t.Errorf("old agent exit %d", code)
	}
	waitFor("new-ns")
	stopNew()
	if code := <-newDone; code != 0 {
		t.Errorf("new agent exit %d", code)
	}
}

// Uninstall takes the node agent's lock file out of the state dir with the rest.
func TestUninstallRemovesLockFile(t *testing.T) {
	t.Parallel()
	bin, confDir, plugin := setup(t, flannel)
	stateDir := t.TempDir()
	lock := filepath.Join(stateDir, ".node-agent.lock")
	if err := os.WriteFile(lock, []byte("pod=old pid=1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"--uninstall", "--cni-bin-dir", bin, "--cni-conf-dir", confDir, "--plugin-binary", plugin, "--state-dir", stateDir}, &stderr); code != 0 {
		t.Fatalf("uninstall exit %d: %s", code, stderr.String())
	}
	if _, err := os.Stat(lock); !os.IsNotExist(err) {
		t.Errorf("lock file still there after uninstall: %v", err)
	}
}
