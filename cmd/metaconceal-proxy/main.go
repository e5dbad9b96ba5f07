// Command metaconceal-proxy is the node-local metadata responder: it answers pods'
// metadata requests (redirected to it by the metaconceal CNI plugin), conceals
// kube-env and identity tokens, denies ambiguous requests, and forwards the rest to
// the real metadata server. Subcommands: `metaconceal-proxy doctor` checks a node,
// `metaconceal-proxy remove-host-guard` takes the host guard away (uninstall).
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
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/kubeflags"
	"github.com/metaconceal/metaconceal/internal/logging"
	"github.com/metaconceal/metaconceal/pkg/altsrelay"
	"github.com/metaconceal/metaconceal/pkg/doctor"
	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// defaultListen and defaultALTSListen are GKE's addresses (pkg/gce).
var (
	defaultListen     = gce.Proxy.String()
	defaultALTSListen = gce.ALTSRelay.String()
)

// hostGuardOffWarning is logged when the guard is turned off: it is what stops pods
// that bypass their own netns's rules.
const hostGuardOffWarning = "host guard off (--host-guard=false): pods with default capabilities (CAP_NET_RAW, " +
	"in the default set) can bypass their own netns's rules with raw packets and reach the metadata server, " +
	"kube-env included; and an exposed pod's IP can be spoofed. Turn it off only where no pod runs (tests, benchmarks)"

type options struct {
	listen          cliflag.List
	altsListen      cliflag.List
	altsListenSet   bool
	upstream        string
	metricsListen   string
	stateDir        string
	policyFile      string
	recursive       string
	hostGuard       bool
	removeHostGuard bool
	iptablesBackend string
	metadataAddrs   cliflag.List
	guardConnRate   int // --guard-conn-rate, --guard-conn-burst: the host guard's per-source limit
	guardConnBurst  int
	guardReconcile  time.Duration // --guard-reconcile-interval
	logFormat       string
	logLevel        string
	upstreamTimeout time.Duration
	shutdownGrace   time.Duration
	cache           bool
	cacheTTL        time.Duration
	gcPercent       int // gc.go
	gcLimitMiB      int
	limits          proxy.Limits    // --pod-* and --max-upstream-*: per-pod and global limits
	kube            kubeflags.Flags // --pod-events and how to reach the API server

	// --alts-handshake-timeout, --alts-idle-timeout: the ALTS relay's deadlines
	altsHandshakeTimeout time.Duration
	altsIdleTimeout      time.Duration
}

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

// dispatch runs the subcommand named by args[0], or serves when there is none.
func dispatch(args []string, stdout, stderr io.Writer) int {
	if buildinfo.VersionRequested(args) {
		fmt.Fprintln(stdout, buildinfo.String("metaconceal-proxy"))
		return 0
	}
	if len(args) > 0 {
		switch args[0] {
		case "doctor":
			return doctor.Main(args[1:], stdout, stderr)
		case "remove-host-guard":
			return runRemoveHostGuard(args[1:], stderr)
		}
	}
	return run(args, stderr)
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("metaconceal-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy [flags]\n       metaconceal-proxy doctor [flags]\n       metaconceal-proxy remove-host-guard [flags]\nflags:")
		fs.PrintDefaults()
	}
	addGuardFlags(fs, &o)
	fs.StringVar(&o.metricsListen, "metrics-listen", "127.0.0.1:989", "address:port for /metrics, /healthz and /readyz; empty disables")
	fs.StringVar(&o.stateDir, "state-dir", state.DefaultDir, "the CNI plugin's state dir, to name the pod behind a source IP")
	fs.StringVar(&o.policyFile, "policy", "", "optional policy file (strict JSON: concealPaths, allowQueryKeys with key, paths and value pattern); defaults are GKE's behaviour")
	fs.StringVar(&o.recursive, "recursive", "deny", "recursive listings outside service accounts: deny (as GKE) or filter (strip concealed entries)")
	fs.BoolVar(&o.hostGuard, "host-guard", true, "install the node-wide guard in this network namespace (DNAT of forwarded metadata traffic, REJECT of the rest, anti-spoofing of exposed pods, listen address on lo); it stays after the proxy stops. --host-guard=false only outside a node netns (tests, benchmarks): without it pods with CAP_NET_RAW bypass their own rules")
	fs.BoolVar(&o.removeHostGuard, "remove-host-guard", false, "deprecated: use `metaconceal-proxy remove-host-guard`")
	fs.IntVar(&o.guardConnRate, "guard-conn-rate", hostguard.DefaultConnRate, "host guard: new TCP connections per second per source IP to the proxy and the ALTS relay; SYNs over it (once --guard-conn-burst is spent) are dropped in the kernel, before the proxy accepts. 0 turns it off")
	fs.DurationVar(&o.guardReconcile, "guard-reconcile-interval", hostguard.DefaultReconcileInterval, "host guard: how often the proxy checks that every chain, rule and jump of the guard, and its listen addresses on lo, are in place, and puts back what is missing (logged, metaconceal_guard_repairs_total)")
	fs.IntVar(&o.guardConnBurst, "guard-conn-burst", hostguard.DefaultConnBurst, "host guard: new TCP connections a source IP may open at once before --guard-conn-rate applies (1-10000 with a rate)")
	fs.DurationVar(&o.altsHandshakeTimeout, "alts-handshake-timeout", altsrelay.DefaultHandshakeTimeout, "ALTS relay: a connection that has not sent the HTTP/2 preface and its first gRPC call to the handshaker service within this is closed")
	fs.DurationVar(&o.altsIdleTimeout, "alts-idle-timeout", altsrelay.DefaultIdleTimeout, "ALTS relay: a connection on which no byte moved either way for this long is closed")
	fs.DurationVar(&o.upstreamTimeout, "upstream-timeout", proxy.DefaultUpstreamTimeout, "limit for an upstream answer that is not a long poll (504 after it)")
	fs.DurationVar(&o.shutdownGrace, "shutdown-grace", 10*time.Second, "on SIGTERM, how long open ordinary requests may finish before connections are closed (held long polls are answered 503 at once, so clients retry)")
	fs.BoolVar(&o.cache, "cache", true, "cache service-account tokens (until a safety margin before expiry) and VM-lifetime facts (project-id, instance id/zone/name/..., for --cache-ttl); --cache=false sends every request upstream (identical concurrent GETs still share one)")
	o.kube.Register(fs, eventsHelp)
	fs.DurationVar(&o.cacheTTL, "cache-ttl", proxy.DefaultFactTTL, fmt.Sprintf("how long VM-lifetime facts are served from the cache (at most %s)", proxy.MaxFactTTL))
	fs.IntVar(&o.gcPercent, "gc-percent", defaultGCPercent, "Go garbage collection target, as GOGC (GOGC in the environment wins): the live heap is small and mostly static, so a higher target than Go's 100 saves CPU")
	fs.IntVar(&o.gcLimitMiB, "gc-memory-limit-mib", defaultGCMemoryLimitMiB, "soft memory limit of the Go runtime in MiB, as GOMEMLIMIT (GOMEMLIMIT in the environment wins); keep it below the container's memory limit; 0: none")
	d := proxy.DefaultLimits
	fs.Float64Var(&o.limits.PodRate, "pod-rate", d.PodRate, "requests per second per pod (token bucket; 429 with Retry-After over it); 0 turns the rate limit off")
	fs.IntVar(&o.limits.PodBurst, "pod-burst", d.PodBurst, "requests a pod may send at once before --pod-rate applies (at least 1 with a rate)")
	fs.IntVar(&o.limits.PodMaxConns, "pod-max-conns", d.PodMaxConns, "open connections per pod, held long polls included (429 and close over it); 0 turns it off")
	fs.IntVar(&o.limits.PodMaxLongPolls, "pod-max-long-polls", d.PodMaxLongPolls, "held long polls (wait_for_change=true) per pod (429 over it); 0 turns it off")
	fs.IntVar(&o.limits.MaxUpstreamLongPolls, "max-upstream-long-polls", d.MaxUpstreamLongPolls, "distinct long polls open upstream at once, all pods together (identical polls share one; 503 over it); a pod holds at most 1/8 of it, and the last 1/4 goes to pods holding little (429 over its share); 0 turns it off")
	fs.IntVar(&o.limits.MaxUpstreamConns, "max-upstream-conns", d.MaxUpstreamConns, "ordinary requests in flight upstream at once, all pods together (a request waits up to 1 s for a slot, then 503); a pod holds at most 1/8 of it, and the last 1/4 goes to pods holding little (429 over its share); 0 turns it off")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.cacheTTL <= 0 || o.cacheTTL > proxy.MaxFactTTL {
		return o, fmt.Errorf("--cache-ttl %s: want more than 0 and at most %s", o.cacheTTL, proxy.MaxFactTTL)
	}
	if o.altsHandshakeTimeout <= 0 || o.altsIdleTimeout <= 0 {
		return o, fmt.Errorf("--alts-handshake-timeout %s, --alts-idle-timeout %s: want more than 0", o.altsHandshakeTimeout, o.altsIdleTimeout)
	}
	if o.gcPercent < 1 || o.gcLimitMiB < 0 {
		return o, fmt.Errorf("--gc-percent %d, --gc-memory-limit-mib %d: want at least 1 and 0 or more", o.gcPercent, o.gcLimitMiB)
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(o.listen) == 0 {
		o.listen = cliflag.List{defaultListen}
	}
	if !o.altsListenSet {
		o.altsListen = cliflag.List{defaultALTSListen}
	}
	return o, nil
}

// addGuardFlags registers the flags that the serving proxy and remove-host-guard share:
// where the proxy listens and what the guard covers, and logging.
func addGuardFlags(fs *flag.FlagSet, o *options) {
	fs.Var(&o.listen, "listen", "address:port to serve pods on; repeatable or comma-separated (default "+defaultListen+")")
	fs.StringVar(&o.upstream, "upstream", "http://"+gce.MetadataIPv4.String(), "the real metadata server, scheme and host only")
	fs.Func("alts-listen", "address:port of the ALTS relay, which relays pods' TCP to metadata port "+fmt.Sprint(gce.ALTSPort)+" (the ALTS handshaker) to the --upstream host's port "+fmt.Sprint(gce.ALTSPort)+"; repeatable or comma-separated (e.g. an IPv6 one too); empty disables it (that port is then refused) (default "+defaultALTSListen+")",
		func(v string) error { o.altsListenSet = true; return o.altsListen.Set(v) })
	fs.Var(&o.metadataAddrs, "metadata-addr", "metadata server addresses the host guard covers; repeatable or comma-separated (default: the --upstream IP, plus "+gce.MetadataIPv6.String()+", GCE's IPv6 metadata address: redirected when a --listen address is IPv6, rejected otherwise)")
	fs.StringVar(&o.iptablesBackend, "iptables-backend", string(xtables.BackendAuto), "iptables programs for the host guard, as the plugin's iptablesBackend: auto (iptables on PATH; empty means the same), nft or legacy")
	fs.StringVar(&o.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
}

// parseRemoveFlags parses `metaconceal-proxy remove-host-guard`'s flags: the same
// --listen, --upstream, --metadata-addr and --iptables-backend as the proxy was run with.
func parseRemoveFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("metaconceal-proxy remove-host-guard", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy remove-host-guard [flags]\n"+
			"removes the host guard, its anti-spoofing rules and the lo addresses it added from this network namespace\nflags:")
		fs.PrintDefaults()
	}
	addGuardFlags(fs, &o)
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(o.listen) == 0 {
		o.listen = cliflag.List{defaultListen}
	}
	if !o.altsListenSet {
		o.altsListen = cliflag.List{defaultALTSListen}
	}
	return o, nil
}

// parseUpstream checks --upstream the way proxy.New does, so that remove-host-guard
// and the guard's config see the same URL.
func parseUpstream(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("--upstream %q: %w", raw, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--upstream %q: want an http:// or https:// URL with a host", raw)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return nil, fmt.Errorf("--upstream %q: want scheme and host only", u.Redacted())
	}
	return u, nil
}

// guardConfig derives the host guard's config from the flags (pkg/hostguard does the
// work; the node's IPv6 stack decides whether GCE's IPv6 address is guarded too).
func guardConfig(o options, upstream *url.URL) (hostguard.Config, error) {
	return hostguard.ConfigFrom(hostguard.Settings{
		Listen: o.listen, ALTSListen: o.altsListen, Upstream: upstream, MetadataAddrs: o.metadataAddrs,
		Backend: o.iptablesBackend, IPv6: hostguard.IPv6Enabled(),
		ConnRate: o.guardConnRate, ConnBurst: o.guardConnBurst,
	})
}

// checkAddrs checks the syntax of every address flag, so that a typo fails before the
// host guard is installed rather than at the listen that follows it.
func checkAddrs(o options) error {
	for _, l := range o.listen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			return fmt.Errorf("--listen %q: %w", l, err)
		}
	}
	for _, l := range o.altsListen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			return fmt.Errorf("--alts-listen %q: %w", l, err)
		}
	}
	if o.metricsListen != "" {
		if _, _, err := net.SplitHostPort(o.metricsListen); err != nil {
			return fmt.Errorf("--metrics-listen %q: %w", o.metricsListen, err)
		}
	}
	if o.shutdownGrace < 0 {
		return fmt.Errorf("--shutdown-grace %s: want 0 or more", o.shutdownGrace)
	}
	return nil
}

// command parses a command's flags with parse and builds its logger; code is the exit
// code to return at once when ok is false (0 for -h, 2 for bad flags).
func command(name string, args []string, stderr io.Writer, parse func([]string, io.Writer) (options, error)) (o options, log *slog.Logger, code int, ok bool) {
	o, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return o, nil, 0, false
	}
	if err == nil {
		log, err = logging.New(stderr, o.logFormat, o.logLevel)
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return o, nil, 2, false
	}
	return o, log, 0, true
}

func runRemoveHostGuard(args []string, stderr io.Writer) int {
	o, log, code, ok := command("metaconceal-proxy remove-host-guard", args, stderr, parseRemoveFlags)
	if !ok {
		return code
	}
	if err := removeHostGuard(o, log); err != nil {
		log.Error("metaconceal-proxy remove-host-guard failed", "err", err)
		return 1
	}
	return 0
}

func removeHostGuard(o options, log *slog.Logger) error {
	upstream, err := parseUpstream(o.upstream)
	if err != nil {
		return err
	}
	gcfg, err := guardConfig(o, upstream)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := hostguard.Remove(ctx, gcfg, log); err != nil {
		return fmt.Errorf("remove host guard: %w", err)
	}
	log.Info("host guard removed")
	return nil
}

func run(args []string, stderr io.Writer) int {
	o, log, code, ok := command("metaconceal-proxy", args, stderr, parseFlags)
	if !ok {
		return code
	}
	tuneGC(o, log) // gc.go
	if err := serve(o, log); err != nil {
		log.Error("metaconceal-proxy failed", "err", err)
		return 1
	}
	return 0
}

func serve(o options, log *slog.Logger) error {
	if o.removeHostGuard {
		log.Warn("--remove-host-guard is deprecated and will be removed in the next release: run `metaconceal-proxy remove-host-guard` with the same flags")
		return removeHostGuard(o, log)
	}
	// Everything is validated before the first side effect (the guard, listeners).
	if err := checkAddrs(o); err != nil {
		return err
	}
	upstream, err := parseUpstream(o.upstream)
	if err != nil {
		return err
	}
	var gcfg hostguard.Config
	if o.hostGuard {
		if gcfg, err = guardConfig(o, upstream); err != nil {
			return err
		}
	} else {
		log.Warn(hostGuardOffWarning)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	mode, err := policy.ParseRecursiveMode(o.recursive)
	if err != nil {
		return fmt.Errorf("--recursive: %w", err)
	}
	pcfg := policy.Config{Recursive: mode}
	if o.policyFile != "" {
		data, err := os.ReadFile(o.policyFile) // pkg/policy does no I/O
		if err != nil {
			return fmt.Errorf("--policy: read %s: %w", o.policyFile, err)
		}
		if pcfg.File, err = policy.ParseFile(data); err != nil {
			return fmt.Errorf("--policy: %s: %w", o.policyFile, err)
		}
	}
	pol, err := policy.New(pcfg)
	if err != nil {
		return fmt.Errorf("--policy: %w", err)
	}

	metrics := proxy.NewMetrics()
	metrics.Registry.MustRegister(buildinfo.NewCollector())
	var podOpts []podindex.Option
	var guard *hostguard.Guard
	if o.hostGuard {
		guard, err = hostguard.New(gcfg, hostguard.Options{Interval: o.guardReconcile, Log: log, Registerer: metrics.Registry})
		if err != nil {
			return fmt.Errorf("--guard-reconcile-interval: %w", err)
		}
		// Exposed pods are served in full only once the anti-spoofing rules hold
		// for their IPs (see pkg/podindex).
		podOpts = append(podOpts, podindex.WithProtector(guard.Spoof()))
	}
	pods := podindex.New(o.stateDir, log, podOpts...)

	var relay *altsrelay.Relay
	if len(o.altsListen) > 0 {
		relay, err = altsrelay.New(altsrelay.Config{
			Upstream:         net.JoinHostPort(upstream.Hostname(), fmt.Sprint(gce.ALTSPort)),
			Pods:             pods,
			Log:              log,
			Registerer:       metrics.Registry,
			HandshakeTimeout: o.altsHandshakeTimeout,
			IdleTimeout:      o.altsIdleTimeout,
		})
		if err != nil {
			return fmt.Errorf("--alts-listen: %w", err)
		}
	}
	notify, stopEvents, err := blockNotifier(&o.kube, log)
	if err != nil {
		return fmt.Errorf("--pod-events: %w", err)
	}
	defer stopEvents()
	handler, err := proxy.New(proxy.Config{
		Notify:          notify,
		Upstream:        upstream,
		Policy:          pol,
		Pods:            pods,
		Log:             log,
		Metrics:         metrics,
		UpstreamTimeout: o.upstreamTimeout,
		Cache:           proxy.CacheConfig{Disabled: !o.cache, FactTTL: o.cacheTTL},
		Limits:          o.limits,
	})
	if err != nil {
		return err
	}
	defer handler.Close()

	if o.hostGuard {
		// Installed after every flag was validated and before listening: it also puts
		// the listen address on lo. It is never removed on exit, so a restart opens no
		// window; see `metaconceal-proxy remove-host-guard`.
		if err := guard.Install(ctx); err != nil {
			return fmt.Errorf("install host guard: %w", err)
		}
		defer guard.Start(ctx)() // re-asserted every --guard-reconcile-interval until shutdown
		// Anti-spoofing rules follow the state dir also when no request asks: a
		// departed exposed pod's rule must not block its IP's next owner.
		pods.Refresh(true)
		go pods.Run(ctx, time.Second, 60)
	}

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
	altsLns := map[net.Listener]bool{}
	for _, addr := range o.altsListen {
		ln, err := proxy.Listen(ctx, addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("--alts-listen: %w", err)
		}
		listeners = append(listeners, ln)
		altsLns[ln] = true
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
		if altsLns[ln] {
			go func() { errc <- relay.Serve(ln) }()
			continue
		}
		go func() { errc <- srv.Serve(handler.Listener(ln)) }() // per-pod connection caps
	}
	var admin *http.Server
	if adminLn != nil {
		admin = proxy.NewAdminServer(handler, log)
		go func() { errc <- admin.Serve(adminLn) }()
	}
	log.Info("metaconceal-proxy serving", "listen", []string(o.listen), "upstream", upstream.Redacted(),
		"alts_listen", []string(o.altsListen), "metrics", o.metricsListen, "recursive", mode.String(), "policy", o.policyFile, "host_guard", o.hostGuard)

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
	relayDone := make(chan error, 1)
	if relay != nil {
		// The relay drains within the same grace as the HTTP side, concurrently.
		go func() { relayDone <- relay.Shutdown(shutdownCtx) }()
	} else {
		relayDone <- nil
	}
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Requests still open after the grace period: close them; clients retry.
		log.Warn("open requests cut after the shutdown grace", "err", err)
		handler.Close()
		if err := srv.Close(); err != nil {
			log.Warn("closing listeners", "err", err)
		}
	}
	if err := <-relayDone; err != nil {
		log.Warn("ALTS connections cut after the shutdown grace", "err", err)
	}
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) && !errors.Is(serveErr, altsrelay.ErrClosed) {
		return serveErr
	}
	return nil
}
