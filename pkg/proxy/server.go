package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/metaconceal/metaconceal/pkg/reuseport"
)

// Server timeouts. Every phase of a client connection has a deadline: reading the
// request head (ReadHeaderTimeout, also from accept to the first request), waiting
// between requests (IdleTimeout); a request body is never read (requests announcing
// one are refused at once and the connection closed); writing an ordinary answer
// (the upstream timeout plus 10 s, set per request); a held long poll (its
// timeout_sec plus the slack, then 10 s to write the answer). There is no server-wide
// WriteTimeout because a long poll is held for up to an hour.
const (
	ReadHeaderTimeout = 10 * time.Second
	IdleTimeout       = 90 * time.Second
	MaxHeaderBytes    = 16 << 10
)

// NewServer returns the http.Server for the proxy's listeners.
func NewServer(h http.Handler, log *slog.Logger) *http.Server {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: ReadHeaderTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		// "OPTIONS *" must reach the policy (and be denied), not net/http's own answer.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// Per-pod connection accounting does not depend on h's type: a connection
	// accepted through Handler.Listener carries its pod (and is counted against its
	// caps) however h is wrapped. Without a wrapped listener, a *Handler counts the
	// connection itself; anything else cannot, and says so.
	srv.ConnContext = connContext
	if ph, ok := h.(*Handler); ok {
		srv.ConnContext = ph.ConnContext
		srv.ConnState = ph.ConnState
	} else {
		log.Warn("the proxy's handler is wrapped: only connections accepted through Handler.Listener count against the per-pod caps")
	}
	return srv
}

// AdminMux serves /metrics, /healthz (the process is up) and /readyz (the upstream
// answers) for the admin address.
func AdminMux(h *Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(h.metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := h.Ready(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// NewAdminServer returns the http.Server for the admin address (AdminMux).
func NewAdminServer(h *Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           AdminMux(h),
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// ErrAddressNotConfigured is returned by Listen when the address is not on the host.
var ErrAddressNotConfigured = errors.New("listen address is not configured on this host")

// Listen opens a TCP listener with SO_REUSEPORT (pkg/reuseport: the next instance of
// a rolling update binds beside this one), turning "cannot assign requested address"
// into a message that says what to do.
func Listen(ctx context.Context, addr string) (net.Listener, error) {
	ln, err := reuseport.Listen(ctx, addr)
	if errors.Is(err, syscall.EADDRNOTAVAIL) {
		host, _, _ := net.SplitHostPort(addr)
		return nil, fmt.Errorf("listen on %s: %w (add it to lo, e.g. `ip addr add %s/32 dev lo`, or let the host guard add it): %w",
			addr, ErrAddressNotConfigured, host, err)
	}
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ln, nil
}
