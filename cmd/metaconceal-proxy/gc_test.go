package main

import (
	"io"
	"log/slog"
	"runtime/debug"
	"strings"
	"testing"
)

func TestGCFlags(t *testing.T) {
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.gcPercent != defaultGCPercent || o.gcLimitMiB != defaultGCMemoryLimitMiB || !o.cache || o.cacheTTL <= 0 {
		t.Errorf("defaults: gc %d, limit %d MiB, cache %v ttl %s", o.gcPercent, o.gcLimitMiB, o.cache, o.cacheTTL)
	}
	for _, args := range [][]string{{"--gc-percent", "0"}, {"--gc-memory-limit-mib", "-1"}} {
		if _, err := parseFlags(args, io.Discard); err == nil || !strings.Contains(err.Error(), strings.TrimPrefix(args[0], "--")) {
			t.Errorf("%v: err = %v, want one naming the flag", args, err)
		}
	}

	// Applied when the environment does not say otherwise (not parallel: global state).
	t.Setenv("GOGC", "")
	t.Setenv("GOMEMLIMIT", "")
	prevGC, prevLimit := debug.SetGCPercent(100), debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetGCPercent(prevGC); debug.SetMemoryLimit(prevLimit) })
	tuneGC(flagValues{gcPercent: 300, gcLimitMiB: 200}, slog.New(slog.DiscardHandler))
	if got := debug.SetGCPercent(100); got != 300 {
		t.Errorf("GC percent %d, want 300", got)
	}
	if got := debug.SetMemoryLimit(-1); got != 200<<20 {
		t.Errorf("memory limit %d, want %d", got, 200<<20)
	}
	t.Setenv("GOGC", "50")
	tuneGC(flagValues{gcPercent: 300}, slog.New(slog.DiscardHandler))
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("with GOGC set: GC percent %d, want it left alone (100)", got)
	}
}
