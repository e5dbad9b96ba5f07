package installer

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/conflist"
)

const calico = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "ipam": {"type": "calico-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

// waitLimit bounds every wait for the watcher; the debounce in these tests is 20 ms.
const waitLimit = 10 * time.Second

type node struct {
	bin, conf, plugin string
}

func newNode(t *testing.T) node {
	t.Helper()
	root := t.TempDir()
	n := node{bin: filepath.Join(root, "bin"), conf: filepath.Join(root, "net.d"), plugin: filepath.Join(root, "image", "metaconceal")}
	for _, d := range []string{n.bin, n.conf, filepath.Dir(n.plugin)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(n.plugin, []byte("#!/bin/sh\necho plugin v1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n node) installer(t *testing.T) *Installer {
	t.Helper()
	in, err := New(Options{
		BinDir: n.bin, ConfDir: n.conf, PluginBinary: n.plugin,
		Entry:    conflist.Entry{Mode: "SECURE", Proxy: "169.254.169.252:988"},
		Debounce: 20 * time.Millisecond, Resync: time.Hour,
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	return in
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func (n node) write(t *testing.T, name, body string) {
	t.Helper()
	// Like Calico's install-cni: a temp file renamed over the config.
	tmp := filepath.Join(n.conf, name+".tmp")
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(n.conf, name)); err != nil {
		t.Fatal(err)
	}
}

// entries counts metaconceal entries in a conflist, -1 when it does not parse.
func entries(path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if json.Unmarshal(data, &list) != nil {
		return -1
	}
	n := 0
	for _, p := range list.Plugins {
		if p.Type == conflist.PluginType {
			n++
		}
	}
	return n
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", waitLimit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestInstallBinary(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	dst := filepath.Join(n.bin, "metaconceal")
	changed, err := InstallBinary(n.plugin, n.bin, "metaconceal")
	if err != nil || !changed {
		t.Fatalf("first copy: changed %v, %v", changed, err)
	}
	info, err := os.Stat(dst)
	if err != nil || info.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v, %v; want mode 0755", info, err)
	}
	inode := info.Sys().(*syscall.Stat_t).Ino
	if changed, err := InstallBinary(n.plugin, n.bin, "metaconceal"); err != nil || changed {
		t.Fatalf("same content: changed %v, %v; want unchanged", changed, err)
	}
	if info, _ := os.Stat(dst); info.Sys().(*syscall.Stat_t).Ino != inode {
		t.Error("same content was rewritten")
	}
	if err := os.WriteFile(n.plugin, []byte("#!/bin/sh\necho plugin v2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := InstallBinary(n.plugin, n.bin, "metaconceal"); err != nil || !changed {
		t.Fatalf("new content: changed %v, %v; want changed", changed, err)
	}
	if got, _ := os.ReadFile(dst); !bytes.Contains(got, []byte("v2")) {
		t.Errorf("installed content %q", got)
	}
	if _, err := InstallBinary(filepath.Join(n.bin, "missing"), n.bin, "metaconceal"); err == nil {
		t.Error("missing source: no error")
	}
	assertDir(t, n.bin, "metaconceal")
	if removed, err := RemoveBinary(n.bin, "metaconceal"); err != nil || !removed {
		t.Fatalf("RemoveBinary: %v, %v", removed, err)
	}
	if removed, err := RemoveBinary(n.bin, "metaconceal"); err != nil || removed {
		t.Fatalf("second RemoveBinary: %v, %v; want nothing to remove", removed, err)
	}
}

func TestOnceWaitsForConfig(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	in := n.installer(t)
	done := make(chan error, 1)
	go func() { done <- in.Once(context.Background()) }()
	// The binary goes in before any config is there.
	waitFor(t, "binary installed", func() bool { _, err := os.Stat(filepath.Join(n.bin, "metaconceal")); return err == nil })
	select {
	case err := <-done:
		t.Fatalf("Once returned %v with no config to patch", err)
	case <-time.After(100 * time.Millisecond):
	}
	n.write(t, "10-calico.conflist", calico)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Once did not notice the config")
	}
	if got := entries(filepath.Join(n.conf, "10-calico.conflist")); got != 1 {
		t.Errorf("%d entries, want 1", got)
	}
}

func TestOnceRemovesLeftoverTempFiles(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	n.write(t, "10-calico.conflist", calico)
	for _, p := range []string{
		filepath.Join(n.conf, ".10-calico.conflist.metaconceal-tmp-123"),
		filepath.Join(n.bin, ".metaconceal.metaconceal-tmp-456"),
	} {
		if err := os.WriteFile(p, []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.installer(t).Once(context.Background()); err != nil {
		t.Fatal(err)
	}
	assertDir(t, n.conf, "10-calico.conflist")
	assertDir(t, n.bin, "metaconceal")
}

func TestOnceGivesUpWithContext(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := n.installer(t).Once(ctx); err == nil || !strings.Contains(err.Error(), "waiting for a CNI config") {
		t.Fatalf("Once: %v; want a wait error", err)
	}
}

func TestOnceRefusesBadConfig(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	bad := strings.Replace(calico, "]", "", 1)
	n.write(t, "10-calico.conflist", bad)
	err := n.installer(t).Once(context.Background())
	if err == nil || !strings.Contains(err.Error(), "10-calico.conflist") {
		t.Fatalf("Once: %v; want an error naming the file", err)
	}
	if got, _ := os.ReadFile(filepath.Join(n.conf, "10-calico.conflist")); string(got) != bad {
		t.Error("bad config was written to")
	}
	assertDir(t, n.conf, "10-calico.conflist")
}

// TestWatchRestoresEntry runs the watcher, rewrites the config under it as Calico does,
// and expects the entry back; then checks the watcher does not react to its own write.
func TestWatchRestoresEntry(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	path := filepath.Join(n.conf, "10-calico.conflist")
	n.write(t, "10-calico.conflist", calico)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.installer(t).Run(ctx, false) }()
	waitFor(t, "entry installed", func() bool { return entries(path) == 1 })

	for round := range 3 {
		n.write(t, "10-calico.conflist", calico) // the main CNI puts its own file back
		waitFor(t, "entry restored after rewrite", func() bool { return entries(path) == 1 })
		t.Logf("round %d: entry back", round)
	}

	// Our own write must not start a loop: the file stays the same inode for a while.
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // 15 debounce periods
	if again, err := os.Stat(path); err != nil || !os.SameFile(info, again) {
		t.Error("the watcher rewrote the file without any outside change")
	}

	// Another CNI's file becomes primary (sorts first): it gets the entry.
	n.write(t, "05-cilium.conflist", `{"cniVersion":"0.3.1","name":"generic-veth","plugins":[{"type":"ptp"},{"type":"cilium-cni"}]}`)
	waitFor(t, "entry in the new primary", func() bool { return entries(filepath.Join(n.conf, "05-cilium.conflist")) == 1 })

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	// Without --uninstall-on-exit everything stays.
	if entries(path) != 1 {
		t.Error("entry removed on exit")
	}
	if _, err := os.Stat(filepath.Join(n.bin, "metaconceal")); err != nil {
		t.Error("binary removed on exit")
	}
}

// TestUninstallOnExit: with uninstallOnExit, cancelling the context (SIGTERM in main)
// gives back the original file byte for byte and removes the binary.
func TestUninstallOnExit(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	path := filepath.Join(n.conf, "10-calico.conflist")
	n.write(t, "10-calico.conflist", calico)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.installer(t).Run(ctx, true) }()
	waitFor(t, "entry installed", func() bool { return entries(path) == 1 })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Run did not return after cancel")
	}
	if got, _ := os.ReadFile(path); string(got) != calico {
		t.Errorf("config after uninstall:\n%s\nwant the original:\n%s", got, calico)
	}
	assertDir(t, n.bin)
	assertDir(t, n.conf, "10-calico.conflist")
}

func TestUninstallKeepsBinaryWhenEntryStays(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	in := n.installer(t)
	n.write(t, "10-calico.conflist", calico)
	if err := in.Once(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Broken by hand while still naming our plugin: the entry may be in use.
	broken := filepath.Join(n.conf, "20-broken.conflist")
	if err := os.WriteFile(broken, []byte(`{"plugins":[{"type":"metaconceal"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err == nil || !strings.Contains(err.Error(), "plugin binary kept") {
		t.Fatalf("Uninstall: %v; want an error keeping the binary", err)
	}
	if _, err := os.Stat(filepath.Join(n.bin, "metaconceal")); err != nil {
		t.Error("binary removed although an entry could not be")
	}
	if err := os.Remove(broken); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	assertDir(t, n.bin)
}

func TestNewChecksDirs(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	if _, err := New(Options{BinDir: n.bin, ConfDir: filepath.Join(n.conf, "missing")}); err == nil || !strings.Contains(err.Error(), "CNI conf dir") {
		t.Errorf("missing conf dir: %v", err)
	}
	if _, err := New(Options{BinDir: n.plugin, ConfDir: n.conf}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("bin dir is a file: %v", err)
	}
}

func assertDir(t *testing.T, dir string, names ...string) {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, de := range des {
		got = append(got, de.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Errorf("%s holds %v, want %v", dir, got, names)
	}
}
