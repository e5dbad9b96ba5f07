package proxyapp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"

	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// readiness is what /readyz answers from, besides the upstream: every listener the
// app serves (any number, of any kind: tracked by Track) has an Accept loop running,
// the host guard was reconciled once, and the app is not draining. In a rolling update
// the DaemonSet removes the old pod only once the new one is ready, so a new proxy
// that is not yet accepting on every address must not say it is.
type readiness struct {
	mu        sync.Mutex
	listeners []*trackedListener
	guardOK   atomic.Bool // set once the guard was installed and reconciled (or there is none)
	draining  atomic.Bool
}

// trackedListener notes when its Accept loop first runs and when it closes.
type trackedListener struct {
	net.Listener
	name      string
	accepting atomic.Bool
	closed    atomic.Bool
}

func (l *trackedListener) Accept() (net.Conn, error) {
	l.accepting.Store(true)
	return l.Listener.Accept()
}

func (l *trackedListener) Close() error {
	l.closed.Store(true)
	return l.Listener.Close()
}

// Track returns ln wrapped so that readiness waits for its Accept loop; name says which
// listener it is in /readyz's answer (e.g. "proxy 169.254.169.252:988").
func (r *readiness) Track(name string, ln net.Listener) net.Listener {
	t := &trackedListener{Listener: ln, name: name}
	r.mu.Lock()
	r.listeners = append(r.listeners, t)
	r.mu.Unlock()
	return t
}

// check says why the app is not ready, or nil.
func (r *readiness) check() error {
	if r.draining.Load() {
		return errors.New("draining: shutting down")
	}
	if !r.guardOK.Load() {
		return errors.New("host guard not yet reconciled")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.listeners) == 0 {
		return errors.New("no listener open")
	}
	for _, l := range r.listeners {
		switch {
		case l.closed.Load():
			return fmt.Errorf("listener %s closed", l.name)
		case !l.accepting.Load():
			return fmt.Errorf("listener %s not yet accepting", l.name)
		}
	}
	return nil
}

// adminHandler serves next (proxy.AdminMux) with /readyz answered by readiness first,
// then by the upstream check.
func (r *readiness) adminHandler(h *proxy.Handler, next http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", next)
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, req *http.Request) {
		err := r.check()
		if err == nil {
			err = h.Ready(req.Context())
		}
		if err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// listenProbeSocket opens the unix socket the admin endpoints are also served on, for
// the DaemonSet's exec probes (`metaconceal-proxy probe`): with SO_REUSEPORT the old and
// the new pod share the TCP metrics address, so an HTTP probe there may be answered by
// the other pod; the socket lives in the pod's own emptyDir. A socket file left by an
// earlier run of this container is replaced.
func listenProbeSocket(ctx context.Context, path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the old probe socket %s: %w", path, err)
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("probe socket: %w", err)
	}
	return ln, nil
}
