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

const flannel = `{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

func setup(t *testing.T, conf string) (bin, confDir, plugin string) {
	t.Helper()
	root := t.TempDir()
	bin, confDir, plugin = filepath.Join(root, "bin"), filepath.Join(root, "net.d"), filepath.Join(root, "metaconceal")
	for _, d := range []string{bin, confDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(plugin, []byte("plugin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-flannel.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return bin, confDir, plugin
}

func TestRunFlags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		conf     string
		args     []string
		code     int
		wantLog  string
		wantConf string // substring of the config afterwards
	}{
		{"once installs", flannel, []string{"--once", "--exclude-namespaces", "kube-system, istio-system"}, 0, "entry=added", `"excludeNamespaces": [`},
		{"bad mode", flannel, []string{"--once", "--mode", "LOCKED"}, 2, `unknown value \"LOCKED\"`, ""},
		{"alts reject", flannel, []string{"--once", "--alts", "reject"}, 0, "entry=added", `"alts": "reject"`},
		{"alts default relay", flannel, []string{"--once"}, 0, "entry=added", `"alts": "relay"`},
		{"bad alts", flannel, []string{"--once", "--alts", "drop"}, 2, `unknown value \"drop\"`, ""},
		{"bad proxy", flannel, []string{"--once", "--proxy", "localhost:988"}, 2, `is not IPv4:port`, ""},
		{"once with uninstall", flannel, []string{"--once", "--uninstall"}, 2, "exclude each other", ""},
		{"unparsable config", "{" + flannel, []string{"--once"}, 1, "not valid JSON", ""},
		{"stray argument", flannel, []string{"--once", "extra"}, 2, "unexpected arguments", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bin, confDir, plugin := setup(t, tc.conf)
			var stderr bytes.Buffer
			args := append([]string{"--cni-bin-dir", bin, "--cni-conf-dir", confDir, "--plugin-binary", plugin}, tc.args...)
			if code := run(context.Background(), args, &stderr); code != tc.code {
				t.Fatalf("exit %d, want %d; log:\n%s", code, tc.code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.wantLog) {
				t.Errorf("log lacks %q:\n%s", tc.wantLog, stderr.String())
			}
			got, err := os.ReadFile(filepath.Join(confDir, "10-flannel.conflist"))
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantConf == "" && string(got) != tc.conf {
				t.Errorf("config changed:\n%s", got)
			}
			if tc.wantConf != "" && !strings.Contains(string(got), tc.wantConf) {
				t.Errorf("config lacks %q:\n%s", tc.wantConf, got)
			}
		})
	}
}

func TestRunUninstall(t *testing.T) {
	t.Parallel()
	bin, confDir, plugin := setup(t, flannel)
	base := []string{"--cni-bin-dir", bin, "--cni-conf-dir", confDir, "--plugin-binary", plugin}
	var stderr bytes.Buffer
	if code := run(context.Background(), append(base, "--once"), &stderr); code != 0 {
		t.Fatalf("--once exit %d:\n%s", code, stderr.String())
	}
	if code := run(context.Background(), append(base, "--uninstall"), &stderr); code != 0 {
		t.Fatalf("--uninstall exit %d:\n%s", code, stderr.String())
	}
	if got, _ := os.ReadFile(filepath.Join(confDir, "10-flannel.conflist")); string(got) != flannel {
		t.Errorf("not restored:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(bin, "metaconceal")); !os.IsNotExist(err) {
		t.Errorf("binary still there: %v", err)
	}
}

// TestRunSIGTERM: the watch mode with --uninstall-on-exit cleans up when its context
// (cancelled by SIGTERM in main) ends.
func TestRunSIGTERM(t *testing.T) {
	t.Parallel()
	bin, confDir, plugin := setup(t, flannel)
	ctx, cancel := context.WithCancel(context.Background())
	var stderr bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--cni-bin-dir", bin, "--cni-conf-dir", confDir, "--plugin-binary", plugin, "--uninstall-on-exit", "--log-format", "json"}, &stderr)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, _ := os.ReadFile(filepath.Join(confDir, "10-flannel.conflist"))
		if strings.Contains(string(got), "metaconceal") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("entry not installed in watch mode")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d", code)
	}
	if got, _ := os.ReadFile(filepath.Join(confDir, "10-flannel.conflist")); string(got) != flannel {
		t.Errorf("not restored on exit:\n%s", got)
	}
	if _, err := os.Stat(filepath.Join(bin, "metaconceal")); !os.IsNotExist(err) {
		t.Errorf("binary still there: %v", err)
	}
}
