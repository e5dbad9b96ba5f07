// Package podindex maps a source IP to the pod it belongs to, from the state records
// the CNI plugin writes (pkg/state). The proxy sees the pod IP as the source of a
// redirected request, because the pod's DNAT rewrites only the destination.
//
// The index is reloaded lazily: a lookup stats the state dir and reloads when its
// mtime changed (records are renamed in and removed, which bumps it), or when the IP is
// unknown and the last reload is older than MissReloadInterval (covers file systems
// with coarse mtimes). Lookups happen only for requests the policy blocks, so the
// stat costs nothing on the allowed path.
package podindex

import (
	"errors"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// MissReloadInterval bounds how often an unknown IP forces a reload.
const MissReloadInterval = 200 * time.Millisecond

// Pod names a pod, and says whether the plugin left it unconcealed on purpose.
type Pod struct {
	Namespace string
	Name      string
	// Exposed: the plugin deliberately left this attachment unconcealed (mode EXPOSED
	// or an excluded namespace); the proxy then serves it in full.
	Exposed bool
}

// Index is safe for concurrent use.
type Index struct {
	dir string
	log *slog.Logger

	mu   sync.Mutex // serializes reloads
	snap atomic.Pointer[snapshot]
}

type snapshot struct {
	byIP     map[netip.Addr]Pod
	mtime    time.Time
	exists   bool
	loadedAt time.Time
}

// New returns an index over dir. Nothing is read until the first lookup.
func New(dir string, log *slog.Logger) *Index {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	x := &Index{dir: dir, log: log}
	x.snap.Store(&snapshot{})
	return x
}

// Lookup returns the pod that owns ip.
func (x *Index) Lookup(ip netip.Addr) (Pod, bool) {
	ip = ip.Unmap()
	snap := x.snap.Load()
	mtime, exists := x.dirMtime()
	if !snap.loadedAt.IsZero() && mtime.Equal(snap.mtime) && exists == snap.exists {
		if pod, ok := snap.byIP[ip]; ok {
			return pod, true
		}
		if time.Since(snap.loadedAt) < MissReloadInterval {
			return Pod{}, false
		}
	}
	snap = x.reload(snap)
	pod, ok := snap.byIP[ip]
	return pod, ok
}

// Len is the number of IPs known after the last reload.
func (x *Index) Len() int { return len(x.snap.Load().byIP) }

func (x *Index) dirMtime() (time.Time, bool) {
	fi, err := os.Stat(x.dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			x.log.Warn("podindex: stat state dir", "dir", x.dir, "err", err)
		}
		return time.Time{}, false
	}
	return fi.ModTime(), true
}

func (x *Index) reload(seen *snapshot) *snapshot {
	x.mu.Lock()
	defer x.mu.Unlock()
	if cur := x.snap.Load(); cur != seen {
		return cur // another lookup reloaded meanwhile
	}
	// Take the mtime before listing, so a change during the listing triggers another
	// reload next time instead of being lost.
	mtime, exists := x.dirMtime()
	records, err := state.List(x.dir)
	if err != nil {
		// List returns the records it could read along with the error.
		x.log.Warn("podindex: some state records could not be read", "dir", x.dir, "err", err)
	}
	byIP := make(map[netip.Addr]Pod, len(records))
	for _, rec := range records {
		pod := Pod{Namespace: rec.PodNamespace, Name: rec.PodName, Exposed: rec.Exposed}
		for _, s := range rec.IPs {
			ip, ok := parseIP(s)
			if !ok {
				x.log.Warn("podindex: state record holds an unparsable IP", "record", rec.Key(), "ip", s)
				continue
			}
			if prev, dup := byIP[ip]; dup {
				// Two records claim one IP: a stale one (a DEL that failed, not yet
				// collected by GC) and the IP's new owner. Which is which cannot be told
				// here, so the IP is exposed only if every claim says so (fail closed).
				x.log.Warn("podindex: two state records claim one IP; treating it as concealed unless both are exposed",
					"ip", ip, "record", rec.Key(), "pod", rec.PodNamespace+"/"+rec.PodName, "otherPod", prev.Namespace+"/"+prev.Name)
				merged := pod
				merged.Exposed = prev.Exposed && pod.Exposed
				byIP[ip] = merged
				continue
			}
			byIP[ip] = pod
		}
	}
	snap := &snapshot{byIP: byIP, mtime: mtime, exists: exists, loadedAt: time.Now()}
	x.snap.Store(snap)
	return snap
}

func parseIP(s string) (netip.Addr, bool) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Addr{}, false
		}
		return p.Addr().Unmap(), true
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}
