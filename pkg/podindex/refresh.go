package podindex

import (
	"context"
	"time"

	"github.com/fsnotify/fsnotify"
)

// MinRefreshGap is the least time between two refreshes caused by state-dir changes:
// a new pod is attested at most this much plus one apply after its record appears
// (until then its connections are unattributed: concealed).
const MinRefreshGap = 200 * time.Millisecond

// Run refreshes the index until ctx is done: as soon as the state dir changes
// (inotify on the dir: the plugin renames records in and removes them; the events
// that queued during one refresh are taken together by the next), and every interval
// in any case (the dir may not exist yet, inotify may be unavailable or overflow),
// forcing a full reload and re-apply every forceEvery intervals (0: never), which also
// repairs rules someone removed. It runs off every connection's path.
//
// Refreshes caused by changes are at least MinRefreshGap apart: under churn (pods
// added and deleted many times a second) every change would otherwise cost one
// iptables-restore, which took 62-71% of a core at 40 changes a second
// (docs/figures.md, the churn section of make bench-proxy); changes that arrive within
// the gap are taken together by the next refresh.
func (x *Index) Run(ctx context.Context, interval time.Duration, forceEvery int) {
	var (
		events  <-chan fsnotify.Event // nil (never ready) until the dir is watched
		errs    <-chan error
		watched bool
	)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		x.log.Warn("podindex: no inotify watcher; polling the state dir only", "interval", interval.String(), "err", err)
	} else {
		defer w.Close()
	}
	watch := func() {
		if w == nil || watched {
			return
		}
		if err := w.Add(x.dir); err == nil {
			watched, events, errs = true, w.Events, w.Errors
		}
	}
	drain := func() {
		for {
			select {
			case <-events:
			default:
				return
			}
		}
	}
	watch()
	t := time.NewTicker(interval)
	defer t.Stop()
	var last time.Time // the last refresh caused by a change
	for n := 1; ; {
		select {
		case <-ctx.Done():
			return
		case <-events:
			if wait := MinRefreshGap - time.Since(last); wait > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
			}
			drain()
			x.Refresh(false)
			last = time.Now()
		case err := <-errs:
			x.log.Warn("podindex: inotify on the state dir; the poll goes on", "dir", x.dir, "err", err)
		case <-t.C:
			watch() // the dir may have been created since
			x.Refresh(forceEvery > 0 && n%forceEvery == 0)
			n++
		}
	}
}
