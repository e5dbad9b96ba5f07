package main

import (
	"io"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// The per-pod and global limit flags default to proxy.DefaultLimits, and 0 turns
// each one off.
func TestLimitFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.limits != proxy.DefaultLimits {
		t.Errorf("default limits %+v, want %+v", o.limits, proxy.DefaultLimits)
	}
	o, err = parseFlags([]string{"--pod-rate=0", "--pod-burst=7", "--pod-max-conns=0", "--pod-max-long-polls=3",
		"--max-upstream-long-polls=0", "--max-upstream-conns=9"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want := proxy.Limits{PodBurst: 7, PodMaxLongPolls: 3, MaxUpstreamConns: 9}
	if o.limits != want {
		t.Errorf("limits %+v, want %+v", o.limits, want)
	}
	if _, err := parseFlags([]string{"--pod-max-conns=x"}, io.Discard); err == nil {
		t.Error("--pod-max-conns=x accepted")
	}
}
