package bypass

import (
	"bufio"
	"fmt"
	"net/http"
	"net/netip"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// fillRecords writes n records of other pods, all on p's host interface, whose keys
// sort before p's: a connection from p walks past every one of their rules.
func (w *world) fillRecords(n int, p pod) {
	w.t.Helper()
	for i := range n {
		rec := state.NewRecord(state.Attachment{Network: "test", ContainerID: fmt.Sprintf("a-%03d", i), IfName: "eth0", HostIf: p.hostIf},
			state.PodRef{Namespace: "fill", Name: fmt.Sprint("pod-", i)}, []netip.Addr{netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)})}, "")
		if err := state.Write(w.stateDir, rec); err != nil {
			w.t.Fatal(err)
		}
	}
}

// BenchmarkRecordToRule: with 110 attachments recorded, the time from a new record in
// the state dir to its attestation rule in the node's nat table, less the wait for
// the refresher's next tick (RefreshInterval, 100 ms): one Refresh (stat, read every
// record, publish the snapshot, iptables-save of two chains, one iptables-restore).
func BenchmarkRecordToRule(b *testing.B) {
	w := newWorld(b)
	p := w.addPod("brr", "10.251.0.2")
	w.installGuard()
	w.fillRecords(109, p)
	w.record(p, "")
	w.refresh()
	i := 0
	for b.Loop() {
		b.StopTimer()
		i++
		rec := state.NewRecord(state.Attachment{Network: "test", ContainerID: fmt.Sprintf("new-%d", i%2), IfName: "eth0", HostIf: p.hostIf},
			state.PodRef{Namespace: "new", Name: "pod"}, []netip.Addr{netip.AddrFrom4([4]byte{10, 249, 0, byte(1 + i%200)})}, "")
		if err := state.Write(w.stateDir, rec); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		w.index.Refresh(false)
	}
}

// BenchmarkConnection: one new connection from a pod to the metadata address, one
// request, close, on a node with 110 recorded attachments; attested (the pod's rule
// is the last of 110 in the nat chain) or unattributed (no record for it: it walks
// all 110 and falls through to the guard's DNAT). What attestation adds per
// connection is the difference to a node without records (none).
func BenchmarkConnection(b *testing.B) {
	for _, tc := range []struct {
		name      string
		records   int
		recordPod bool
	}{{"no-records", 0, false}, {"attested-110", 109, true}, {"unattributed-110", 110, false}} {
		b.Run(tc.name, func(b *testing.B) {
			w := newWorld(b)
			p := w.addPod("bco", "10.251.0.2")
			w.installGuard()
			w.fillRecords(tc.records, p)
			if tc.recordPod {
				w.record(p, "")
			}
			w.refresh()
			req := "GET /computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
			for b.Loop() {
				c, err := dialFromIn(p.path, p.ip, metadataAddr.String())
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write([]byte(req)); err != nil {
					b.Fatal(err)
				}
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil || resp.StatusCode != http.StatusOK {
					b.Fatalf("answer: %v, %v", resp, err)
				}
				resp.Body.Close()
				c.Close()
			}
		})
	}
}
