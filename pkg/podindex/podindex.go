// Package podindex maps a source IP to the pod it belongs to, from the state records
// the CNI plugin writes (pkg/state), and keeps the host guard's attestation rules in
// line with those records.
//
// A source IP alone is not an identity (any pod with CAP_NET_RAW forges one): the proxy
// asks the index only for connections the kernel attested, i.e. that the host guard's
// per-attachment rules sent to an attested listener because they came from one of the
// attachment's IPs on its host interface (pkg/hostguard, attest.go). The index then
// names the pod behind that IP.
//
// Lookups never wait: they read an immutable snapshot through an atomic pointer, with
// no file system access and no lock. The refresher (Run, refresh.go, in its own
// goroutine) wakes on the state dir's changes (inotify) and every interval, and, when
// the dir changed, reads every record, publishes a new snapshot, and then hands the records to the Attestor (the host guard), which
// rewrites its rules. The snapshot is published first, so a connection attested by the
// new rules always finds its pod; a pod whose record is not yet in the snapshot is
// served as unattributed, never held.
package podindex

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

// Pod names a pod, and says whether the plugin left it unconcealed on purpose.
type Pod struct {
	Namespace string
	Name      string
	UID       string // K8S_POD_UID, for Events on the pod
	// Exposed: the record says the plugin left this attachment unconcealed (mode
	// EXPOSED or an excluded namespace). Informational: the proxy serves a connection
	// in full only when it arrived on the exposed listener, which only the host guard's
	// rule for this attachment's interface leads to.
	Exposed bool
}

// Attestor keeps the kernel's attestation rules in line with the records;
// *hostguard.SpoofGuard implements it.
type Attestor interface {
	Attest(ctx context.Context, recs []state.Record) error
}

// AttestTimeout bounds one Attest call.
const AttestTimeout = 30 * time.Second

// Option configures an Index.
type Option func(*Index)

// WithAttestor hands every new set of records to a (see the package doc).
func WithAttestor(a Attestor) Option { return func(x *Index) { x.attestor = a } }

// Index is safe for concurrent use.
type Index struct {
	dir      string
	log      *slog.Logger
	attestor Attestor

	mu        sync.Mutex // serializes Refresh
	snap      atomic.Pointer[snapshot]
	attestErr bool // the last Attest failed: the next Refresh applies again
}

type snapshot struct {
	byIP     map[netip.Addr]Pod
	mtime    time.Time
	exists   bool
	loadedAt time.Time
}

// New returns an index over dir. Nothing is read until the first Refresh: until
// then every lookup misses.
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

// Refresh reloads the index when the state dir changed since the last load, when the
// last Attest failed, or always with force; then it hands the records to the
// Attestor. It runs in the refresher, never on a connection's path.
func (x *Index) Refresh(force bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	snap := x.snap.Load()
	mtime, exists := x.dirMtime()
	if !force && !x.attestErr && !snap.loadedAt.IsZero() && mtime.Equal(snap.mtime) && exists == snap.exists {
		return
	}
	records, err := state.List(x.dir)
	if err != nil {
		// List returns the records it could read along with the error.
		x.log.Warn("podindex: some state records could not be read", "dir", x.dir, "err", err)
	}
	// Published before the rules change: a connection the new rules attest finds its pod.
	x.snap.Store(&snapshot{byIP: x.index(records), mtime: mtime, exists: exists, loadedAt: time.Now()})
	if x.attestor == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), AttestTimeout)
	defer cancel()
	if err := x.attestor.Attest(ctx, records); err != nil {
		x.attestErr = true
		x.log.Error("podindex: attestation rules could not be updated; new pods are served as unattributed until they are", "err", err)
		return
	}
	x.attestErr = false
}

// Lookup returns the pod that owns ip in the current snapshot. It never blocks and
// never touches the file system. An IP that two records claim is not found: which
// pod sent it cannot be told (fail closed: unattributed).
func (x *Index) Lookup(ip netip.Addr) (Pod, bool) {
	pod, ok := x.snap.Load().byIP[ip.Unmap()]
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

// index maps each IP to its record's pod; an IP two records claim maps to none.
func (x *Index) index(records []state.Record) map[netip.Addr]Pod {
	byIP := make(map[netip.Addr]Pod, len(records))
	dup := map[netip.Addr]bool{}
	for _, rec := range records {
		pod := Pod{Namespace: rec.PodNamespace, Name: rec.PodName, UID: rec.PodUID, Exposed: rec.Exposed}
		for _, s := range rec.IPs {
			ip, ok := state.ParseIP(s)
			if !ok {
				x.log.Warn("podindex: state record holds an unparsable IP", "record", rec.Key(), "ip", s)
				continue
			}
			if prev, seen := byIP[ip]; seen || dup[ip] {
				// A stale record (a DEL that failed, not yet collected by GC) and the
				// IP's new owner: which one asks cannot be told from the records.
				x.log.Warn("podindex: two state records claim one IP; its connections are unattributed until one goes",
					"ip", ip, "record", rec.Key(), "pod", rec.PodNamespace+"/"+rec.PodName, "otherPod", prev.Namespace+"/"+prev.Name)
				delete(byIP, ip)
				dup[ip] = true
				continue
			}
			byIP[ip] = pod
		}
	}
	return byIP
}

// Ingress says how a connection reached the proxy or the relay, i.e. which of their
// listeners accepted it; the host guard's rules decide it at connection set-up
// (pkg/hostguard, attest.go).
type Ingress uint8

const (
	// Unattributed: the proxy's or the relay's own port. Nothing vouches for the
	// source: concealed, in one budget shared by every unattributed connection.
	Unattributed Ingress = iota
	// Attested: sent by the guard's rule for a recorded attachment, whose IP and host
	// interface the packets matched.
	Attested
	// Exposed: as Attested, for an attachment the plugin left unconcealed; served in full.
	Exposed
)

func (i Ingress) String() string {
	switch i {
	case Attested:
		return "attested"
	case Exposed:
		return "exposed"
	}
	return "unattributed"
}
