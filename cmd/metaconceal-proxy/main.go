// Command metaconceal-proxy is the node-local metadata responder: it answers pods'
// metadata requests (redirected to it by the metaconceal CNI plugin), conceals
// kube-env and identity tokens, denies ambiguous requests, and forwards the rest to
// the real metadata server. `metaconceal-proxy doctor` checks a node instead.
//
// This file is wiring only: flags, signals, listeners. The logic is in pkg/policy,
// pkg/proxy, pkg/podindex and pkg/hostguard.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/logging"
	"github.com/metaconceal/metaconceal/pkg/doctor"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/pkg/state"
)

const defaultListen = "169.254.169.252:988"

// gceMetadataAddr6 is GCE's IPv6 metadata address.
var gceMetadataAddr6 = netip.MustParseAddr("fd20:ce::254")

// ipv6Enabled reports whether this netns has an IPv6 stack (ipv6.disable=1 removes it).
var ipv6Enabled = func() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
}

type options struct {
	listen          cliflag.List
	upstream        string
	metricsListen   string
	stateDir        string
	policyFile      string
	recursive       string
	hostGuard       bool
	removeHostGuard bool
	iptablesBackend string
	metadataAddrs   cliflag.List
	logFormat       string
	logLevel        string
	upstreamTimeout time.Duration
	shutdownGrace   time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "doctor" {
		os.Exit(doctor.Main(os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(run(os.Args[1:], os.Stderr))
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("metaconceal-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy [flags]\n       metaconceal-proxy doctor [flags]\nflags:")
		fs.PrintDefaults()
	}
	fs.Var(&o.listen, "listen", "address:port to serve pods on; repeatable or comma-separated (default "+defaultListen+")")
	fs.StringVar(&o.upstream, "upstream", "http://169.254.169.254", "the real metadata server, scheme and host only")
	fs.StringVar(&o.metricsListen, "metrics-listen", "127.0.0.1:989", "address:port for /metrics, /healthz and /readyz; empty disables")
	fs.StringVar(&o.stateDir, "state-dir", state.DefaultDir, "the CNI plugin's state dir, to name the pod behind a source IP")
	fs.StringVar(&o.policyFile, "policy", "", "optional policy file (JSON: concealPaths, allowQueryKeys); defaults are GKE's behaviour")
	fs.StringVar(&o.recursive, "recursive", "deny", "recursive listings outside service accounts: deny (as GKE) or filter (strip concealed entries)")
	fs.BoolVar(&o.hostGuard, "host-guard", false, "install the node-wide guard (DNAT of forwarded metadata traffic, REJECT of the rest, listen address on lo); it stays after the proxy stops")
	fs.BoolVar(&o.removeHostGuard, "remove-host-guard", false, "remove what --host-guard installed, then exit (for uninstall)")
	fs.Var(&o.metadataAddrs, "metadata-addr", "metadata server addresses the host guard covers; repeatable or comma-separated (default: the --upstream IP, plus fd20:ce::254, GCE's IPv6 metadata address: redirected when a --listen address is IPv6, rejected otherwise)")
	fs.StringVar(&o.iptablesBackend, "iptables-backend", "", "iptables binaries for the host guard: empty (iptables on PATH), nft or legacy")
	fs.StringVar(&o.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.DurationVar(&o.upstreamTimeout, "upstream-timeout", proxy.DefaultUpstreamTimeout, "limit for an upstream answer that is not a long poll (504 after it)")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 10*time.Second, "on SIGTERM, how long open ordinary requests may finish before connections are closed (held long polls are answered 503 at once, so clients retry)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(o.listen) == 0 {
		o.listen = cliflag.List{defaultListen}
	}
	return o, nil
}

// guardConfig derives the host guard's config from the listen addresses and the
// upstream (whose address and port are what pods try to reach).
func guardConfig(o options, upstream *url.URL) (hostguard.Config, error) {
	cfg := hostguard.Config{Backend: hostguard.Backend(o.iptablesBackend)}
	for _, l := range o.listen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil {
			return cfg, fmt.Errorf("--listen %q: the host guard needs an IP:port: %w", l, err)
		}
		cfg.ListenAddrs = append(cfg.ListenAddrs, ap)
	}
	for _, a := range o.metadataAddrs {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return cfg, fmt.Errorf("--metadata-addr %q: %w", a, err)
		}
		cfg.MetadataAddrs = append(cfg.MetadataAddrs, ip)
	}
	if len(cfg.MetadataAddrs) == 0 {
		ip, err := netip.ParseAddr(upstream.Hostname())
		if err != nil {
			ip = hostguard.DefaultMetadataAddr
		}
		cfg.MetadataAddrs = []netip.Addr{ip}
		// GCE answers on its IPv6 address too. Guard it whenever the node has IPv6: with
		// an IPv6 --listen address pods' TCP to port 80 goes there, without one every
		// packet to it is rejected (fail closed), so a dual-stack pod that flushed its
		// own rules gets nothing over IPv6. A node without IPv6 routes no IPv6 for pods,
		// and ip6tables could not be programmed there.
		if ip.Unmap().Is4() && ipv6Enabled() {
			cfg.MetadataAddrs = append(cfg.MetadataAddrs, gceMetadataAddr6)
		}
	}
	if p := upstream.Port(); p != "" {
		port, err := strconv.ParseUint(p, 10, 16)
		if err != nil {
			return cfg, fmt.Errorf("--upstream port %q: %w", p, err)
		}
		cfg.MetadataPort = uint16(port)
	}
	return cfg, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "metaconceal-proxy:", err)
		return 2
	}
	log, err := logging.New(stderr, o.logFormat, o.logLevel)
	if err != nil {
		fmt.Fprintln(stderr, "metaconceal-proxy:", err)
		return 2
	}
	if err := serve(o, log); err != nil {
		log.Error("metaconceal-proxy failed", "err", err)
		return 1
	}
	return 0
}

func serve(o options, log *slog.Logger) error {
	upstream, err := url.Parse(o.upstream)
	if err != nil {
		return fmt.Errorf("--upstream %q: %w", o.upstream, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if o.removeHostGuard {
		gcfg, err := guardConfig(o, upstream)
		if err != nil {
			return err
		}
		if err := hostguard.Remove(ctx, gcfg, log); err != nil {
			return fmt.Errorf("remove host guard: %w", err)
		}
		log.Info("host guard removed")
		return nil
	}

	mode, err := policy.ParseRecursiveMode(o.recursive)
	if err != nil {
		return fmt.Errorf("--recursive: %w", err)
	}
	pcfg := policy.Config{Recursive: mode}
	if o.policyFile != "" {
		if pcfg.File, err = policy.LoadFile(o.policyFile); err != nil {
			return fmt.Errorf("--policy: %w", err)
		}
	}
	pol, err := policy.New(pcfg)
	if err != nil {
		return fmt.Errorf("--policy: %w", err)
	}

	if o.hostGuard {
		// Installed before listening: it also puts the listen address on lo. It is
		// never removed on exit, so a restart opens no window; see --remove-host-guard.
		gcfg, err := guardConfig(o, upstream)
		if err != nil {
			return err
		}
		if err := hostguard.Install(ctx, gcfg, log); err != nil {
			return fmt.Errorf("install host guard: %w", err)
		}
	}

	handler, err := proxy.New(proxy.Config{
		Upstream:        upstream,
		Policy:          pol,
		Pods:            podindex.New(o.stateDir, log),
		Log:             log,
		Metrics:         proxy.NewMetrics(),
		UpstreamTimeout: o.upstreamTimeout,
	})
	if err != nil {
		return err
	}
	defer handler.Close()

	var listeners []net.Listener
	closeAll := func() {
		for _, ln := range listeners {
			ln.Close()
		}
	}
	for _, addr := range o.listen {
		ln, err := proxy.Listen(ctx, addr)
		if err != nil {
			closeAll()
			return err
		}
		listeners = append(listeners, ln)
	}
	var adminLn net.Listener
	if o.metricsListen != "" {
		if adminLn, err = proxy.Listen(ctx, o.metricsListen); err != nil {
			closeAll()
			return fmt.Errorf("--metrics-listen: %w", err)
		}
	}

	srv := proxy.NewServer(handler, log)
	errc := make(chan error, len(listeners)+1)
	for _, ln := range listeners {
		go func() { errc <- srv.Serve(ln) }()
	}
	var admin *http.Server
	if adminLn != nil {
		admin = proxy.NewAdminServer(handler, log)
		go func() { errc <- admin.Serve(adminLn) }()
	}
	log.Info("metaconceal-proxy serving", "listen", []string(o.listen), "upstream", upstream.Redacted(),
		"metrics", o.metricsListen, "recursive", mode.String(), "policy", o.policyFile, "host_guard", o.hostGuard)

	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down", "grace", o.shutdownGrace.String())
	case serveErr = <-errc:
		log.Error("listener failed", "err", serveErr)
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), o.shutdownGrace)
	defer cancel()
	if admin != nil {
		if err := admin.Shutdown(shutdownCtx); err != nil {
			log.Warn("metrics listener did not shut down cleanly", "err", err)
		}
	}
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Requests still open after the grace period: close them; clients retry.
		log.Warn("open requests cut after the shutdown grace", "err", err)
		handler.Close()
		if err := srv.Close(); err != nil {
			log.Warn("closing listeners", "err", err)
		}
	}
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) {
		return serveErr
	}
	return nil
}
