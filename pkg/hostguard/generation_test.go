package hostguard

import (
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// The marker the guard writes is the marker it reads back from iptables-save, and
// anything else in its chain (or no chain) is no marker.
func TestMarkerRoundTrip(t *testing.T) {
	t.Parallel()
	beat := time.Unix(1764950000, 0)
	payload := markerPayload(7, beat)
	// What iptables-save prints for it: the restore lines inside *filter ... COMMIT.
	var rules []string
	for _, l := range strings.Split(payload, "\n") {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	for _, tc := range []struct {
		name string
		save string
		want marker
	}{
		{"written", "*filter\n:" + GenerationChain + " - [0:0]\n" + strings.Join(rules, "\n") + "\nCOMMIT\n", marker{gen: 7, beat: beat, found: true}},
		{"no chain", "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", marker{}},
		{"empty chain", "*filter\n:" + GenerationChain + " - [0:0]\nCOMMIT\n", marker{}},
		{"other rule", "*filter\n:" + GenerationChain + " - [0:0]\n-A " + GenerationChain + ` -m comment --comment "metaconceal generation=x heartbeat=1" -j RETURN` + "\nCOMMIT\n", marker{}},
	} {
		snap, err := xtables.ParseSave(tc.save)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := readMarker(snap); got != tc.want {
			t.Errorf("%s: readMarker = %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
