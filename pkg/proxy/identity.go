package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/podindex"
)

// Who is asking (issue 17). A connection's identity is decided by the listener that
// accepted it, i.e. by the host guard's rules at connection set-up (pkg/hostguard,
// attest.go), never by a lookup that could grant more than the kernel vouched for:
//
//   - podindex.Unattributed (the proxy's own port; also any connection served without
//     the proxy's Listener): concealed, and every such connection shares one podKey,
//     so forged addresses cannot multiply a budget. Audit lines name no pod and no
//     Event is recorded; the requests are counted
//     (metaconceal_proxy_unattributed_requests_total).
//   - podindex.Attested: the pod the index names for the source IP, which the guard's
//     rule matched on the attachment's host interface; unattributed when the index
//     does not know it (yet, or any more: an accept never waits for a reload).
//   - podindex.Exposed: as Attested, and served in full (mode EXPOSED, excluded
//     namespaces). Exposure is the listener's, never the record's.

// unattributedKey is the one budget of every unattributed connection.
var unattributedKey = podKey{namespace: "unattributed"}

// unattributedLabel is the namespace label of unattributed requests in metrics.
const unattributedLabel = "unattributed"

// source is who sent a request: its IP and, when the kernel attested it, its pod.
type source struct {
	ip       string
	addr     netip.Addr
	pod      podindex.Pod // zero unless attested
	attested bool         // the kernel vouched for pod (see above)
	exposed  bool         // attested through the exposed listener: served in full
}

// identifyConn names the client of a connection accepted with ingress in. It reads
// the index's snapshot only: it never waits.
func (h *Handler) identifyConn(addr netip.Addr, in podindex.Ingress) source {
	addr = addr.Unmap()
	s := source{ip: addr.String(), addr: addr}
	if in == podindex.Unattributed || h.pods == nil {
		return s
	}
	pod, ok := h.pods.Lookup(addr)
	if !ok {
		return s
	}
	s.pod, s.attested, s.exposed = pod, true, in == podindex.Exposed
	return s
}

// identify names the client behind a remote address of a connection that came
// through no Listener of the proxy's: nothing attests it.
func (h *Handler) identify(remote string) source {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return source{ip: remote}
	}
	return h.identifyConn(ap.Addr(), podindex.Unattributed)
}

// podKeyOf is the pod key of a source: its pod when attested, else the one
// unattributed key.
func podKeyOf(src source) podKey {
	if !src.attested {
		return unattributedKey
	}
	return podKey{namespace: src.pod.Namespace, name: src.pod.Name}
}

// nsLabel is the namespace label of a source in metrics.
func nsLabel(src source) string {
	switch {
	case !src.attested:
		return unattributedLabel
	case src.pod.Namespace == "":
		return "unknown"
	}
	return src.pod.Namespace
}

// unattributedLog is what the rate-limited log of unattributed requests keeps.
type unattributedLog struct {
	since  atomic.Int64 // requests since the last line
	logged atomic.Int64 // when the last line was written, in Unix nanoseconds
}

// unattributedLogEvery bounds the log lines about unattributed requests.
const unattributedLogEvery = 10 * time.Second

// countUnattributed counts a request of an unattributed source and logs, at most
// once per unattributedLogEvery, how many there were.
func (h *Handler) countUnattributed(src source, path string) {
	if src.attested {
		return
	}
	h.metrics.unattributed.Inc()
	h.unattributed.since.Add(1)
	now := time.Now().UnixNano()
	last := h.unattributed.logged.Load()
	if now-last < int64(unattributedLogEvery) || !h.unattributed.logged.CompareAndSwap(last, now) {
		return
	}
	h.log.LogAttrs(context.Background(), slog.LevelInfo, "unattributed metadata requests: served as concealed, in one shared budget",
		slog.Int64("requests_since_last_line", h.unattributed.since.Swap(0)),
		slog.String("last_source_ip", src.ip),
		slog.String("last_path", clip(path, maxAuditField)))
}

// ListenerFor wraps a listener of the proxy's whose connections all have ingress in
// (see Listener for the connection cap).
func (h *Handler) ListenerFor(ln net.Listener, in podindex.Ingress) net.Listener {
	return &podListener{Listener: ln, h: h, in: in}
}
