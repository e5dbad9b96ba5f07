// Package podindex maps a source IP to the pod it belongs to, from the state records
// the CNI plugin writes (pkg/state). The proxy sees the pod IP as the source of a
// redirected request, because the pod's DNAT rewrites only the destination.
//
// The index is reloaded lazily: a lookup stats the state dir and reloads when its
// mtime changed (records are renamed in and removed, which bumps it), or when the IP is
// unknown and the last reload is older than MissReloadInterval (covers file systems
// with coarse mtimes). Lookups happen only for requests the policy blocks, so the
// stat costs nothing on the allowed path.
//
// Exposure can be borrowed by spoofing a source IP. With a Protector (the host guard's
// anti-spoofing rules, hostguard.SpoofGuard), a pod is reported exposed only when
// its record names its host-side interface and the protector confirms that traffic
// from its IP now reaches the proxy only through that interface; every reload hands the
// protector the current exposed IPs first. Without a Protector (host guard off) the
// record alone decides, as pods can then reach the metadata server directly anyway.
package podindex

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"slices"
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
	UID       string // K8S_POD_UID, for Events on the pod
	// Exposed: the plugin deliberately left this attachment unconcealed (mode EXPOSED
	// or an excluded namespace); the proxy then serves it in full.
	Exposed bool
}

// Protector makes sure that traffic from each claimed IP reaches the proxy only
// through the listed host interfaces, and returns the IPs for which that now holds.
// *hostguard.SpoofGuard implements it.
type Protector interface {
	Protect(ctx context.Context, claims map[netip.Addr][]string) (map[netip.Addr]bool, error)
}

// ProtectTimeout bounds one Protect call.
const ProtectTimeout = 30 * time.Second

// Option configures an Index.
type Option func(*Index)

// WithProtector gates exposure on p (see the package doc).
func WithProtector(p Protector) Option { return func(x *Index) { x.protector = p } }

// Index is safe for concurrent use.
type Index struct {
	dir       string
	log       *slog.Logger
	protector Protector

	mu   sync.Mutex // serializes reloads
	snap atomic.Pointer[snapshot]
}

type snapshot struct {
	byIP     map[netip.Addr]Pod
	mtime    time.Time
	exists   bool
	loadedAt time.Time
}

// New returns an index over dir. Nothing is read until the first lookup or Refresh.
func New(dir string, log *slog.Logger, opts ...Option) *Index {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	x := &Index{dir: dir, log: log}
	for _, o := range opts {
		o(x)
	}
	x.snap.Store(&snapshot{})
	return x
}

// Refresh reloads the index when the state dir changed since the last load (or
// always, with force). With a Protector this is what keeps its rules in line with the
// records when no lookup happens: a departed exposed pod's rule must not outlive it.
func (x *Index) Refresh(force bool) {
	snap := x.snap.Load()
	mtime, exists := x.dirMtime()
	if !force && !snap.loadedAt.IsZero() && mtime.Equal(snap.mtime) && exists == snap.exists {
		return
	}
	x.reload(snap)
}

// Run calls Refresh every interval until ctx is done, forcing a reload every
// forceEvery intervals (which also repairs the protector's rules if someone removed
// them). The proxy runs it when the host guard is on.
func (x *Index) Run(ctx context.Context, interval time.Duration, forceEvery int) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			x.Refresh(forceEvery > 0 && n%forceEvery == 0)
		}
	}
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
	hostIfs := map[netip.Addr][]string{} // every claim's host interface; "" when a record names none
	for _, rec := range records {
		pod := Pod{Namespace: rec.PodNamespace, Name: rec.PodName, UID: rec.PodUID, Exposed: rec.Exposed}
		for _, s := range rec.IPs {
			ip, ok := parseIP(s)
			if !ok {
				x.log.Warn("podindex: state record holds an unparsable IP", "record", rec.Key(), "ip", s)
				continue
			}
			hostIfs[ip] = append(hostIfs[ip], rec.HostIf)
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
	if x.protector != nil {
		x.protect(byIP, hostIfs)
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

// protect hands the exposed IPs to the protector and keeps exposed only those it
// protects: an IP with a claim that names no host interface, or that the protector
// could not protect, is served as concealed (fail closed).
func (x *Index) protect(byIP map[netip.Addr]Pod, hostIfs map[netip.Addr][]string) {
	claims := map[netip.Addr][]string{}
	for ip, pod := range byIP {
		if !pod.Exposed {
			continue
		}
		ifs := hostIfs[ip]
		if slices.Contains(ifs, "") {
			x.log.Warn("podindex: exposed pod's record names no host interface, so its IP could be spoofed; serving it as concealed",
				"ip", ip, "pod", pod.Namespace+"/"+pod.Name)
			continue
		}
		claims[ip] = ifs
	}
	ctx, cancel := context.WithTimeout(context.Background(), ProtectTimeout)
	defer cancel()
	protected, err := x.protector.Protect(ctx, claims)
	if err != nil {
		x.log.Error("podindex: anti-spoofing rules could not be updated; serving every exposed pod as concealed", "err", err)
		protected = nil
	}
	for ip, pod := range byIP {
		if pod.Exposed && !protected[ip] {
			pod.Exposed = false
			byIP[ip] = pod
		}
	}
}
