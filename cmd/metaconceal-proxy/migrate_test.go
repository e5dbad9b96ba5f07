package main

import (
	"io"
	"log/slog"
	"testing"
)

// net.ipv4.tcp_migrate_req is the node's: set only with the host guard (the proxy runs
// in the node's netns), never with --host-guard=false (a machine's own netns in tests),
// and never with --tcp-migrate-req=false.
func TestMigrateReqOnlyWithTheGuard(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string // Options.ProcSys
	}{
		{nil, "/proc/sys"},
		{[]string{"--proc-sys=/host/proc/sys"}, "/host/proc/sys"},
		{[]string{"--host-guard=false"}, ""},
		{[]string{"--host-guard=false", "--proc-sys=/host/proc/sys"}, ""},
		{[]string{"--tcp-migrate-req=false"}, ""},
	} {
		f, err := parseFlags(tc.args, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		o, err := f.appOptions(slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if o.ProcSys != tc.want {
			t.Errorf("%v: ProcSys %q, want %q", tc.args, o.ProcSys, tc.want)
		}
	}
}
