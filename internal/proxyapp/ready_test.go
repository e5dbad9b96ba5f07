package proxyapp

import (
	"net"
	"strings"
	"testing"
)

// /readyz's own part: ready only with every tracked listener accepting, the guard
// reconciled and no drain; each reason is named.
func TestReadinessCheck(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		listeners int // tracked listeners
		accepting int // of which have entered Accept
		closeOne  bool
		guardOK   bool
		draining  bool
		want      string // "" ready, else a substring of the reason
	}{
		{"ready", 3, 3, false, true, false, ""},
		{"no listener", 0, 0, false, true, false, "no listener"},
		{"one not accepting", 3, 2, false, true, false, "not yet accepting"},
		{"guard not reconciled", 2, 2, false, false, false, "host guard"},
		{"draining", 2, 2, false, true, true, "draining"},
		{"listener closed", 2, 2, true, true, false, "closed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r readiness
			r.guardOK.Store(tc.guardOK)
			r.draining.Store(tc.draining)
			var lns []net.Listener
			for i := range tc.listeners {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { ln.Close() })
				tracked := r.Track("l"+string(rune('0'+i)), ln)
				lns = append(lns, tracked)
				if i < tc.accepting {
					go func() { _, _ = tracked.Accept() }()
				}
			}
			for _, l := range r.listeners[:tc.accepting] {
				for !l.accepting.Load() {
					// the goroutine above marks it before blocking in Accept
				}
			}
			if tc.closeOne {
				lns[0].Close()
			}
			err := r.check()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("check = %v, want ready", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("check = %v, want a reason naming %q", err, tc.want)
			}
		})
	}
}
