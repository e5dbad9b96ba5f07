package main

import (
	"io"
	"net/url"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/hostguard"
)

// The host guard's per-source connection limit defaults to hostguard's defaults,
// --guard-conn-rate=0 turns it off, and bad values are refused by the guard's config
// (before anything is installed).
func TestGuardConnLimitFlags(t *testing.T) {
	t.Parallel()
	up := &url.URL{Scheme: "http", Host: "169.254.169.254"}
	for _, tc := range []struct {
		name        string
		args        []string
		rate, burst uint32
		err         string
	}{
		{"defaults", nil, hostguard.DefaultConnRate, hostguard.DefaultConnBurst, ""},
		{"tuned", []string{"--guard-conn-rate=20", "--guard-conn-burst=50"}, 20, 50, ""},
		{"off", []string{"--guard-conn-rate=0"}, 0, 0, ""},
		{"off, burst ignored", []string{"--guard-conn-rate=0", "--guard-conn-burst=0"}, 0, 0, ""},
		{"no burst", []string{"--guard-conn-burst=0"}, 0, 0, "--guard-conn-burst"},
		{"negative rate", []string{"--guard-conn-rate=-1"}, 0, 0, "--guard-conn-rate"},
		{"burst too large", []string{"--guard-conn-burst=20000"}, 0, 0, "--guard-conn-burst"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			o, err := parseFlags(tc.args, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := guardConfig(o, up)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("guardConfig with %v = %+v, %v; want an error naming %s", tc.args, cfg, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.ConnRate != tc.rate || cfg.ConnBurst != tc.burst {
				t.Errorf("%v: limit %d/s burst %d, want %d/s burst %d", tc.args, cfg.ConnRate, cfg.ConnBurst, tc.rate, tc.burst)
			}
		})
	}
}
