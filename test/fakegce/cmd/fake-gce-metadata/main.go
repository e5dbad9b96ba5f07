// Command fake-gce-metadata serves the project's fake GCE metadata server (package
// fakegce) for tests, benchmarks and the demo. Run it inside a simulated node netns:
// its default listen address is the real metadata address.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/test/fakegce"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("fake-gce-metadata", flag.ContinueOnError)
	var listen, scopes cliflag.List
	fs.Var(&listen, "listen", "address:port to serve on; repeatable or comma-separated (default 169.254.169.254:80)")
	fs.Var(&scopes, "scopes", "node service account scopes; repeatable or comma-separated (default: GKE's default scopes)")
	project := fs.String("project", "", "project id (default fake-project)")
	numericProject := fs.String("numeric-project", "", "numeric project id (default 123456789012)")
	zone := fs.String("zone", "", "zone (default us-central1-a)")
	instance := fs.String("instance-name", "", "instance name")
	cluster := fs.String("cluster-name", "", "cluster-name attribute (default fake-cluster)")
	email := fs.String("service-account-email", "", "node service account email (default <numeric>-compute@developer.gserviceaccount.com)")
	logRequests := fs.Bool("log-requests", false, "log every request (costly under benchmarks)")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var handler slog.Handler
	switch *logFormat {
	case "text":
		handler = slog.NewTextHandler(os.Stderr, nil)
	case "json":
		handler = slog.NewJSONHandler(os.Stderr, nil)
	default:
		fmt.Fprintf(os.Stderr, "fake-gce-metadata: --log-format %q: want text or json\n", *logFormat)
		return 2
	}
	log := slog.New(handler)
	if len(listen) == 0 {
		listen = cliflag.List{"169.254.169.254:80"}
	}

	var opts []fakegce.Option
	for _, o := range []struct {
		v   string
		opt func(string) fakegce.Option
	}{
		{*project, fakegce.WithProjectID},
		{*numericProject, fakegce.WithNumericProjectID},
		{*zone, fakegce.WithZone},
		{*instance, fakegce.WithInstanceName},
		{*cluster, fakegce.WithClusterName},
		{*email, fakegce.WithServiceAccountEmail},
	} {
		if o.v != "" {
			opts = append(opts, o.opt(o.v))
		}
	}
	if len(scopes) > 0 {
		opts = append(opts, fakegce.WithScopes(scopes...))
	}
	srv := fakegce.New(opts...)
	if *logRequests {
		srv.OnRequest(func(r *http.Request) {
			log.Info("request", "remote", r.RemoteAddr, "method", r.Method, "uri", r.RequestURI)
		})
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// No write timeout: long polls may be held for up to an hour, as on GCE.
	httpSrv := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(handler, slog.LevelWarn)}
	var listeners []net.Listener
	for _, addr := range listen {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			log.Error("cannot listen", "addr", addr, "err", err)
			for _, l := range listeners {
				_ = l.Close()
			}
			return 1
		}
		listeners = append(listeners, ln)
	}
	errc := make(chan error, len(listeners))
	for _, ln := range listeners {
		log.Info("serving fake GCE metadata", "addr", ln.Addr().String())
		go func() { errc <- httpSrv.Serve(ln) }()
	}
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-errc:
		log.Error("serve failed", "err", err)
		_ = httpSrv.Close()
		return 1
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := httpSrv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		log.Warn("shutdown", "err", err)
	}
	_ = httpSrv.Close() // held long polls end here
	return 0
}
