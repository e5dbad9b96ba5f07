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
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/gce"
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
	gceServices := fs.Bool("gce-services", true, "on every --listen address that is GCE's metadata address (169.254.169.254, fd20:ce::254), also serve what GCE serves there: DNS (UDP and TCP 53), NTP (UDP 123) and a stand-in ALTS handshaker (TCP 8080: gRPC-shaped h2c, logging each request)")
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
		listen = cliflag.List{net.JoinHostPort(gce.MetadataIPv4.String(), fmt.Sprint(gce.MetadataPort))}
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
	var services fakegce.Services
	defer services.Close()
	if *gceServices {
		if err := serveGCEServices(&services, listen, log); err != nil {
			log.Error("cannot serve GCE's other services", "err", err)
			for _, l := range listeners {
				_ = l.Close()
			}
			return 1
		}
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

// serveGCEServices serves DNS, NTP and the ALTS stand-in on every listen address that is
// one of GCE's metadata addresses.
func serveGCEServices(s *fakegce.Services, listen []string, log *slog.Logger) error {
	s.ALTSLog = log // before any service runs
	var hosts []netip.Addr
	for _, l := range listen {
		ap, err := netip.ParseAddrPort(l)
		if err == nil && (ap.Addr() == gce.MetadataIPv4 || ap.Addr() == gce.MetadataIPv6) {
			hosts = append(hosts, ap.Addr())
		}
	}
	for _, h := range hosts {
		at := func(port uint16) string { return net.JoinHostPort(h.String(), fmt.Sprint(port)) }
		udp, err := net.ListenPacket("udp", at(gce.DNSPort))
		if err != nil {
			return err
		}
		tcp, err := net.Listen("tcp", at(gce.DNSPort))
		if err != nil {
			udp.Close()
			return err
		}
		s.ServeDNS(udp, tcp, hosts)
		ntp, err := net.ListenPacket("udp", at(gce.NTPPort))
		if err != nil {
			return err
		}
		s.ServeNTP(ntp)
		alts, err := net.Listen("tcp", at(gce.ALTSPort))
		if err != nil {
			return err
		}
		s.ServeALTS(alts)
		log.Info("serving GCE's other services", "dns", at(gce.DNSPort), "ntp", at(gce.NTPPort), "alts", at(gce.ALTSPort))
	}
	return nil
}
