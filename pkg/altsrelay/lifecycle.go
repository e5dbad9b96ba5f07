package altsrelay

// The relay's lifecycle: connections open, stopping accepts, the shutdown.

import (
	"context"
	"fmt"
)

// Open returns how many connections are being relayed.
func (r *Relay) Open() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}

// stopAccepting closes the listeners and refuses new connections.
func (r *Relay) stopAccepting() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closing = true
	for ln := range r.listeners {
		ln.Close()
	}
}

// Shutdown stops accepting and waits for open connections to end, until ctx is done;
// then it closes those still open and returns ctx's error.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.stopAccepting()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		r.Close()
		<-done
		return fmt.Errorf("altsrelay: %d connections cut after the shutdown grace: %w", r.cutCount(), ctx.Err())
	}
}

func (r *Relay) cutCount() int { return int(r.cut.Load()) }

// Close stops accepting and closes every open connection at once.
func (r *Relay) Close() error {
	r.stopAccepting()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for rc := range r.conns {
		r.cut.Add(1)
		rc.client.Close()
		if rc.upstream != nil {
			rc.upstream.Close()
		}
	}
	return nil
}
