package podindex

import (
	"context"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Run refreshes the index until ctx is done: as soon as the state dir changes
// (inotify on the dir: the plugin renames records in and removes them; the events
// that queued during one refresh are taken together by the next), and every interval
// in any case (the dir may not exist yet, inotify may be unavailable or overflow),
// forcing a full reload and re-apply every forceEvery intervals (0: never), which also
// repairs rules someone removed. It runs off every connection's path.
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
	for n := 1; ; {
		select {
		case <-ctx.Done():
			return
		case <-events:
			drain()
			x.Refresh(false)
		case err := <-errs:
			x.log.Warn("podindex: inotify on the state dir; the poll goes on", "dir", x.dir, "err", err)
		case <-t.C:
			watch() // the dir may have been created since
			x.Refresh(forceEvery > 0 && n%forceEvery == 0)
			n++
		}
	}
}
