package containerd

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfig(t *testing.T) {
	t.Parallel()
	p := ConfigParams{Dir: "/d", Socket: "/d/c.sock", PauseImage: "pause:1", CNIBinDir: "/b", CNIConfDir: "/n"}
	for _, tc := range []struct {
		apparmor bool
		want     []string
		not      []string
	}{
		{false, []string{`root = "/d/root"`, `state = "/d/state"`, `address = "/d/c.sock"`, `address = "/d/c.sock.ttrpc"`,
			`sandbox_image = "pause:1"`, `Root = "/d/runc"`, `bin_dir = "/b"`, `conf_dir = "/n"`, "netns_mounts_under_state_dir = true", "max_conf_num = 1"},
			[]string{"disable_apparmor"}},
		{true, []string{"  restrict_oom_score_adj = true\n  disable_apparmor = true\n"}, nil},
	} {
		p.DisableAppArmor = tc.apparmor
		got := Config(p)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("apparmor=%v: config lacks %q:\n%s", tc.apparmor, w, got)
			}
		}
		for _, n := range tc.not {
			if strings.Contains(got, n) {
				t.Errorf("apparmor=%v: config has %q:\n%s", tc.apparmor, n, got)
			}
		}
	}
	if got, want := CrictlConfig("/s"), "runtime-endpoint: unix:///s\nimage-endpoint: unix:///s\ntimeout: 60\n"; got != want {
		t.Errorf("CrictlConfig = %q, want %q", got, want)
	}
}

func TestTail(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte("a\nb\nc\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for n, want := range map[int]string{1: "c", 2: "b\nc", 5: "a\nb\nc"} {
		if got := Tail(path, n); got != want {
			t.Errorf("Tail(%d) = %q, want %q", n, got, want)
		}
	}
	if got := Tail(filepath.Join(t.TempDir(), "missing"), 3); !strings.Contains(got, "no such file") {
		t.Errorf("Tail of a missing file = %q, want the error", got)
	}
}
