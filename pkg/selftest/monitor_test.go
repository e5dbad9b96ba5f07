package selftest

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestMonitorStep(t *testing.T) {
	t.Parallel()
	errNoRun := errors.New("cannot enter")
	cases := []struct {
		name    string
		pods    []string // netns names of concealed records (created as files)
		results map[string]Verdict
		want    State
		pod     string
		detail  string
	}{
		{"no pod", nil, nil, StateNotTested, "", "no concealed pod"},
		{"proxy reached", []string{"a"}, map[string]Verdict{"a": Effective}, StateEffective, "ns/a", ""},
		{"dropped", []string{"a"}, map[string]Verdict{"a": Blocked}, StateEffective, "ns/a", ""},
		{"bypassed", []string{"a"}, map[string]Verdict{"a": Bypassed}, StateBypassed, "ns/a", ""},
		{"first pod fails, next decides", []string{"a", "b"}, map[string]Verdict{"b": Bypassed}, StateBypassed, "ns/b", ""},
		{"every pod fails", []string{"a", "b"}, nil, StateNotTested, "", "cannot enter"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			for i, p := range c.pods {
				netns := filepath.Join(dir, "ns-"+p)
				if err := os.WriteFile(netns, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				rec := state.NewRecord(state.Attachment{Network: "n", ContainerID: p, IfName: "eth0", Netns: netns},
					state.PodRef{Namespace: "ns", Name: p}, []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 2)})}, "")
				if err := state.Write(dir, rec); err != nil {
					t.Fatal(err)
				}
			}
			m, err := NewMonitor(MonitorConfig{StateDir: dir, Interval: 1, RunProbe: func(_ context.Context, cfg Config) (Result, error) {
				v, ok := c.results[strings.TrimPrefix(filepath.Base(cfg.Netns), "ns-")]
				if !ok {
					return Result{}, errNoRun
				}
				return Result{Verdict: v, Status: "HTTP/1.1 404 Not Found"}, nil
			}})
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := m.Last(); ok {
				t.Fatal("Last before the first round")
			}
			o := m.Step(context.Background())
			if o.State != c.want || o.Pod != c.pod || !strings.Contains(o.Detail, c.detail) {
				t.Errorf("outcome %+v; want state %s pod %q detail ~%q", o, c.want, c.pod, c.detail)
			}
			if last, ok := m.Last(); !ok || last != o {
				t.Errorf("Last = %+v %v", last, ok)
			}
			if kept, ok, err := ReadOutcome(dir); err != nil || !ok || kept.State != o.State {
				t.Errorf("kept outcome %+v %v %v", kept, ok, err)
			}
		})
	}
}
