package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/internal/buildinfo/buildmetric"
	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/kubeflags"
	"github.com/metaconceal/metaconceal/internal/proxyapp"
	"github.com/metaconceal/metaconceal/pkg/altsrelay"
	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
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

// flagValues are the command line as given; appOptions turns them into proxyapp.Options.
type flagValues struct {
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
	guardGeneration uint64        // --guard-generation
	logFormat       string
	logLevel        string
	upstreamTimeout time.Duration
	shutdownGrace   time.Duration
	probeSocket     string // --probe-socket: the admin endpoints on a unix socket, for exec probes
	tcpMigrateReq   bool   // --tcp-migrate-req: set net.ipv4.tcp_migrate_req=1 through --proc-sys
	procSys         string
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

func parseFlags(args []string, stderr io.Writer) (flagValues, error) {
	var f flagValues
	fs := flag.NewFlagSet("metaconceal-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy [flags]\n       metaconceal-proxy doctor [flags]\n       metaconceal-proxy remove-host-guard [flags]\n       metaconceal-proxy probe [--socket PATH] [--path /readyz]\nflags:")
		fs.PrintDefaults()
	}
	addGuardFlags(fs, &f)
	fs.StringVar(&f.metricsListen, "metrics-listen", "127.0.0.1:989", "address:port for /metrics, /healthz and /readyz; empty disables")
	fs.StringVar(&f.stateDir, "state-dir", state.DefaultDir, "the CNI plugin's state dir, to name the pod behind a source IP")
	fs.StringVar(&f.policyFile, "policy", "", "optional policy file (strict JSON: concealPaths, allowQueryKeys with key, paths and value pattern); defaults are GKE's behaviour")
	fs.StringVar(&f.recursive, "recursive", "deny", "recursive listings outside service accounts: deny (as GKE) or filter (strip concealed entries)")
	fs.BoolVar(&f.hostGuard, "host-guard", true, "install the node-wide guard in this network namespace (DNAT of forwarded metadata traffic, REJECT of the rest, anti-spoofing of exposed pods, listen address on lo); it stays after the proxy stops. --host-guard=false only outside a node netns (tests, benchmarks): without it pods with CAP_NET_RAW bypass their own rules")
	fs.BoolVar(&f.removeHostGuard, "remove-host-guard", false, "deprecated: use `metaconceal-proxy remove-host-guard`")
	fs.IntVar(&f.guardConnRate, "guard-conn-rate", hostguard.DefaultConnRate, "host guard: new TCP connections per second per source IP to the proxy and the ALTS relay; SYNs over it (once --guard-conn-burst is spent) are dropped in the kernel, before the proxy accepts. 0 turns it off")
	fs.DurationVar(&f.guardReconcile, "guard-reconcile-interval", hostguard.DefaultReconcileInterval, "host guard: how often the proxy checks that every chain, rule and jump of the guard, and its listen addresses on lo, are in place, and puts back what is missing (logged, metaconceal_guard_repairs_total)")
	fs.Func("guard-generation", "host guard: this proxy's generation (the DaemonSet passes its pod's pod-template-generation); while a proxy of a newer generation keeps the guard (its heartbeat on the guard is fresh), this one installs and repairs nothing (metaconceal_guard_deferred_to_generation). Empty or unset: 0, the lowest",
		func(v string) error {
			if v == "" {
				f.guardGeneration = 0
				return nil
			}
			n, err := strconv.ParseUint(v, 10, 64)
			f.guardGeneration = n
			return err
		})
	fs.IntVar(&f.guardConnBurst, "guard-conn-burst", hostguard.DefaultConnBurst, "host guard: new TCP connections a source IP may open at once before --guard-conn-rate applies (1-10000 with a rate)")
	fs.DurationVar(&f.altsHandshakeTimeout, "alts-handshake-timeout", altsrelay.DefaultHandshakeTimeout, "ALTS relay: a connection that has not sent the HTTP/2 preface and its first gRPC call to the handshaker service within this is closed")
	fs.DurationVar(&f.altsIdleTimeout, "alts-idle-timeout", altsrelay.DefaultIdleTimeout, "ALTS relay: a connection on which no byte moved either way for this long is closed")
	fs.DurationVar(&f.upstreamTimeout, "upstream-timeout", proxy.DefaultUpstreamTimeout, "limit for an upstream answer that is not a long poll (504 after it)")
	fs.DurationVar(&f.shutdownGrace, "shutdown-grace", 10*time.Second, "on SIGTERM the listeners close at once (the next instance, bound beside with SO_REUSEPORT, takes new connections), held long polls are handed back with the current value (as when their timeout_sec ends), and open requests may finish for this long before their connections are closed; keep it below the pod's terminationGracePeriodSeconds minus 5 s")
	fs.StringVar(&f.probeSocket, "probe-socket", "", "unix socket path on which /healthz, /readyz and /metrics are also served, for exec probes (`metaconceal-proxy probe`) that must reach this instance, not another one sharing --metrics-listen during a rolling update; empty disables")
	fs.BoolVar(&f.tcpMigrateReq, "tcp-migrate-req", true, "set net.ipv4.tcp_migrate_req=1 in the node's network namespace at start (through --proc-sys), so that connections queued on a closing listener move to the next instance's; false leaves the sysctl alone, and so does --host-guard=false. Failing to set it is logged, not fatal")
	fs.StringVar(&f.procSys, "proc-sys", "/proc/sys", "where the node's /proc/sys is mounted read-write (a container's own /proc/sys is read-only; the DaemonSet mounts the node's at /host/proc/sys)")
	fs.BoolVar(&f.cache, "cache", true, "cache service-account tokens (until a safety margin before expiry) and VM-lifetime facts (project-id, instance id/zone/name/..., for --cache-ttl); --cache=false sends every request upstream (identical concurrent GETs still share one)")
	f.kube.Register(fs, eventsHelp)
	fs.DurationVar(&f.cacheTTL, "cache-ttl", proxy.DefaultFactTTL, fmt.Sprintf("how long VM-lifetime facts are served from the cache (at most %s)", proxy.MaxFactTTL))
	fs.IntVar(&f.gcPercent, "gc-percent", defaultGCPercent, "Go garbage collection target, as GOGC (GOGC in the environment wins): the live heap is small and mostly static, so a higher target than Go's 100 saves CPU")
	fs.IntVar(&f.gcLimitMiB, "gc-memory-limit-mib", defaultGCMemoryLimitMiB, "soft memory limit of the Go runtime in MiB, as GOMEMLIMIT (GOMEMLIMIT in the environment wins); keep it below the container's memory limit; 0: none")
	d := proxy.DefaultLimits
	fs.Float64Var(&f.limits.PodRate, "pod-rate", d.PodRate, "requests per second per pod (token bucket; 429 with Retry-After over it); 0 turns the rate limit off")
	fs.IntVar(&f.limits.PodBurst, "pod-burst", d.PodBurst, "requests a pod may send at once before --pod-rate applies (at least 1 with a rate)")
	fs.IntVar(&f.limits.PodMaxConns, "pod-max-conns", d.PodMaxConns, "open connections per pod, held long polls included (429 and close over it); 0 turns it off")
	fs.IntVar(&f.limits.PodMaxLongPolls, "pod-max-long-polls", d.PodMaxLongPolls, "held long polls (wait_for_change=true) per pod (429 over it); 0 turns it off")
	fs.IntVar(&f.limits.MaxUpstreamLongPolls, "max-upstream-long-polls", d.MaxUpstreamLongPolls, "distinct long polls open upstream at once, all pods together (identical polls share one; 503 over it); a pod holds at most 1/8 of it, and the last 1/4 goes to pods holding little (429 over its share); 0 turns it off")
	fs.IntVar(&f.limits.MaxUpstreamConns, "max-upstream-conns", d.MaxUpstreamConns, "ordinary requests in flight upstream at once, all pods together (a request waits up to 1 s for a slot, then 503); a pod holds at most 1/8 of it, and the last 1/4 goes to pods holding little (429 over its share); 0 turns it off")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if f.gcPercent < 1 || f.gcLimitMiB < 0 {
		return f, fmt.Errorf("--gc-percent %d, --gc-memory-limit-mib %d: want at least 1 and 0 or more", f.gcPercent, f.gcLimitMiB)
	}
	return f, listDefaults(fs, &f)
}

// listDefaults refuses stray arguments and fills the list flags' defaults.
func listDefaults(fs *flag.FlagSet, f *flagValues) error {
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(f.listen) == 0 {
		f.listen = cliflag.List{defaultListen}
	}
	if !f.altsListenSet {
		f.altsListen = cliflag.List{defaultALTSListen}
	}
	return nil
}

// addGuardFlags registers the flags that the serving proxy and remove-host-guard share:
// where the proxy listens and what the guard covers, and logging.
func addGuardFlags(fs *flag.FlagSet, f *flagValues) {
	fs.Var(&f.listen, "listen", "address:port to serve pods on; repeatable or comma-separated (default "+defaultListen+")")
	fs.StringVar(&f.upstream, "upstream", "http://"+gce.MetadataIPv4.String(), "the real metadata server, scheme and host only")
	fs.Func("alts-listen", "address:port of the ALTS relay, which relays pods' TCP to metadata port "+fmt.Sprint(gce.ALTSPort)+" (the ALTS handshaker) to the --upstream host's port "+fmt.Sprint(gce.ALTSPort)+"; repeatable or comma-separated (e.g. an IPv6 one too); empty disables it (that port is then refused) (default "+defaultALTSListen+")",
		func(v string) error { f.altsListenSet = true; return f.altsListen.Set(v) })
	fs.Var(&f.metadataAddrs, "metadata-addr", "metadata server addresses the host guard covers; repeatable or comma-separated (default: the --upstream IP, plus "+gce.MetadataIPv6.String()+", GCE's IPv6 metadata address: redirected when a --listen address is IPv6, rejected otherwise)")
	fs.StringVar(&f.iptablesBackend, "iptables-backend", string(xtables.BackendAuto), "iptables programs for the host guard, as the plugin's iptablesBackend: auto (iptables on PATH; empty means the same), nft or legacy")
	fs.StringVar(&f.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
}

// parseRemoveFlags parses `metaconceal-proxy remove-host-guard`'s flags: the same
// --listen, --upstream, --metadata-addr and --iptables-backend as the proxy was run with.
func parseRemoveFlags(args []string, stderr io.Writer) (flagValues, error) {
	var f flagValues
	fs := flag.NewFlagSet("metaconceal-proxy remove-host-guard", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: metaconceal-proxy remove-host-guard [flags]\n"+
			"removes the host guard, its anti-spoofing rules and the lo addresses it added from this network namespace\nflags:")
		fs.PrintDefaults()
	}
	addGuardFlags(fs, &f)
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	return f, listDefaults(fs, &f)
}

// parseUpstream checks --upstream the way proxy.New does, so that remove-host-guard
// and the guard's config see the same URL.
func parseUpstream(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("--upstream %q: %w", raw, err)
	}
	if err := proxy.ValidateUpstream(u); err != nil {
		return nil, fmt.Errorf("--upstream: %w", err)
	}
	return u, nil
}

// guardConfig derives the host guard's config from the flags (pkg/hostguard does the
// work; the node's IPv6 stack decides whether GCE's IPv6 address is guarded too).
// Every error names the flag to change.
func guardConfig(f flagValues, upstream *url.URL) (hostguard.Config, error) {
	s := hostguard.Settings{Upstream: upstream, IPv6: hostguard.IPv6Enabled()}
	var err error
	if s.Listen, err = addrPorts("--listen", f.listen); err != nil {
		return hostguard.Config{}, err
	}
	if s.ALTSListen, err = addrPorts("--alts-listen", f.altsListen); err != nil {
		return hostguard.Config{}, err
	}
	for _, a := range f.metadataAddrs {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return hostguard.Config{}, fmt.Errorf("--metadata-addr %q: %w", a, err)
		}
		s.MetadataAddrs = append(s.MetadataAddrs, ip)
	}
	if s.Backend, err = xtables.ParseBackend(f.iptablesBackend); err != nil {
		return hostguard.Config{}, fmt.Errorf("--iptables-backend: %w", err)
	}
	if f.guardConnRate < 0 || f.guardConnBurst < 0 {
		return hostguard.Config{}, fmt.Errorf("--guard-conn-rate %d, --guard-conn-burst %d: want 0 or more", f.guardConnRate, f.guardConnBurst)
	}
	s.ConnRate, s.ConnBurst = uint32(min(f.guardConnRate, math.MaxUint32)), uint32(min(f.guardConnBurst, math.MaxUint32))
	cfg, err := hostguard.ConfigFrom(s)
	var se *hostguard.SettingError
	if errors.As(err, &se) {
		if flag, ok := guardSettingFlags[se.Setting]; ok {
			return cfg, fmt.Errorf("%s: %w", flag, err)
		}
	}
	return cfg, err
}

// guardSettingFlags names the flag behind each hostguard.Settings field that can be
// wrong.
var guardSettingFlags = map[string]string{
	"Listen": "--listen", "ALTSListen": "--alts-listen", "MetadataAddrs": "--metadata-addr",
	"Backend": "--iptables-backend", "ConnRate": "--guard-conn-rate", "ConnBurst": "--guard-conn-burst",
	"Upstream": "--upstream",
}

// addrPorts parses an address flag's values.
func addrPorts(name string, l cliflag.List) ([]netip.AddrPort, error) {
	var aps []netip.AddrPort
	for _, s := range l {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return nil, fmt.Errorf("%s %q: want IP:port: %w", name, s, err)
		}
		aps = append(aps, ap)
	}
	return aps, nil
}

// appOptions turns the flags into the app's options; every error names its flag.
func (f flagValues) appOptions(log *slog.Logger) (proxyapp.Options, error) {
	o := proxyapp.Options{
		MetricsListen: f.metricsListen, UpstreamTimeout: f.upstreamTimeout, StateDir: f.stateDir,
		Cache: proxy.CacheConfig{Disabled: !f.cache, FactTTL: f.cacheTTL}, Limits: f.limits,
		ALTS:          proxyapp.ALTSOptions{HandshakeTimeout: f.altsHandshakeTimeout, IdleTimeout: f.altsIdleTimeout},
		ShutdownGrace: f.shutdownGrace, Log: log, ProbeSocket: f.probeSocket,
		Collectors: []prometheus.Collector{buildmetric.New()}, // metaconceal_build_info
	}
	// Like the guard, the sysctl belongs to the node's netns: with --host-guard=false
	// (tests, benchmarks on a machine's own netns) it is never touched.
	if f.tcpMigrateReq && f.hostGuard {
		if f.procSys == "" {
			return o, errors.New("--proc-sys: empty; want where /proc/sys is, or --tcp-migrate-req=false")
		}
		o.ProcSys = f.procSys
	}
	var err error
	if o.Listen, err = addrPorts("--listen", f.listen); err != nil {
		return o, err
	}
	if o.ALTS.Listen, err = addrPorts("--alts-listen", f.altsListen); err != nil {
		return o, err
	}
	if o.Upstream, err = parseUpstream(f.upstream); err != nil {
		return o, err
	}
	if f.hostGuard {
		gcfg, err := guardConfig(f, o.Upstream)
		if err != nil {
			return o, err
		}
		o.Guard = &proxyapp.GuardOptions{Config: gcfg, Reconcile: f.guardReconcile, Generation: f.guardGeneration}
	} else {
		log.Warn(hostGuardOffWarning)
	}
	if o.Policy.Recursive, err = policy.ParseRecursiveMode(f.recursive); err != nil {
		return o, fmt.Errorf("--recursive: %w", err)
	}
	if f.policyFile != "" {
		data, err := os.ReadFile(f.policyFile) // pkg/policy does no I/O
		if err != nil {
			return o, fmt.Errorf("--policy: read %s: %w", f.policyFile, err)
		}
		if o.Policy.File, err = policy.ParseFile(data); err != nil {
			return o, fmt.Errorf("--policy: %s: %w", f.policyFile, err)
		}
		log.Info("policy file read", "policy", f.policyFile)
	}
	if o.Events, err = eventsConfig(&f.kube); err != nil {
		return o, fmt.Errorf("--pod-events: %w", err)
	}
	return o, nil
}

// optionFlags names the flag behind each proxyapp.Options field that can be wrong.
var optionFlags = map[string]string{
	"Listen": "--listen", "ALTS.Listen": "--alts-listen", "MetricsListen": "--metrics-listen",
	"Upstream": "--upstream", "Policy": "--policy", "ShutdownGrace": "--shutdown-grace",
	"Cache": "--cache-ttl", "Limits": "--pod-* and --max-upstream-*", "ALTS.HandshakeTimeout": "--alts-handshake-timeout",
	"ALTS.IdleTimeout": "--alts-idle-timeout", "Guard.Reconcile": "--guard-reconcile-interval",
	"Events": "--pod-events", "ProbeSocket": "--probe-socket",
}

// namingFlag prefixes an error about an option with the flag to change.
func namingFlag(err error) error {
	var oe *proxyapp.OptionError
	if errors.As(err, &oe) {
		if name, ok := optionFlags[oe.Option]; ok {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return err
}
