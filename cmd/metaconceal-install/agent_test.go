package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestAgentFlags(t *testing.T) {
	t.Parallel()
	base := []string{"--cni-bin-dir=/b", "--cni-conf-dir=/c"}
	cases := []struct {
		name    string
		args    []string
		enabled bool
		wantErr string
	}{
		{"installer only", nil, false, ""},
		{"gate with node", []string{"--readiness-gate", "--node-name=n1"}, true, ""},
		{"gate without node", []string{"--readiness-gate", "--node-name="}, true, "--node-name"},
		{"events without node", []string{"--pod-events", "--node-name="}, true, "--node-name"},
		{"repair needs no node", []string{"--repair=report", "--node-name="}, true, ""},
		{"bad repair mode", []string{"--repair=fix"}, false, "--repair"},
		{"bad interval", []string{"--repair=repair", "--repair-interval=0s"}, true, "--repair-interval"},
		{"bad backend", []string{"--readiness-gate", "--node-name=n", "--iptables-backend=ebpf"}, true, "--iptables-backend"},
		{"backend auto", []string{"--readiness-gate", "--node-name=n", "--iptables-backend=auto"}, true, ""},
		{"backend empty (auto)", []string{"--readiness-gate", "--node-name=n", "--iptables-backend="}, true, ""},
		{"backend legacy", []string{"--readiness-gate", "--node-name=n", "--iptables-backend=legacy"}, true, ""},
		{"selftest interval negative", []string{"--repair=report", "--selftest-interval=-1s"}, true, "--selftest-interval"},
		{"selftest off", []string{"--repair=report", "--selftest-interval=0"}, true, ""},
		{"selftest report only", []string{"--readiness-gate", "--node-name=n", "--selftest-report-only"}, true, ""},
		{"selftest with a bad proxy", []string{"--repair=report", "--proxy=proxy.local"}, true, "--proxy"},
		{"agent with --once", []string{"--once", "--repair=repair"}, true, "watch mode only"},
		{"agent with --uninstall", []string{"--uninstall", "--metrics-listen=127.0.0.1:990"}, true, "watch mode only"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var stderr bytes.Buffer
			o, err := parseFlags(append(append([]string{}, base...), c.args...), &stderr)
			if err != nil {
				t.Fatalf("parse: %v %s", err, stderr.String())
			}
			err = o.agent.validate(!o.once && !o.uninstall)
			switch {
			case c.wantErr == "" && err != nil:
				t.Errorf("validate: %v", err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Errorf("validate: %v, want an error naming %s", err, c.wantErr)
			}
			if c.wantErr == "" && o.agent.enabled() != c.enabled {
				t.Errorf("enabled %v, want %v", o.agent.enabled(), c.enabled)
			}
		})
	}
}
