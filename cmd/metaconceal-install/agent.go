package main

// The node agent: in watch mode, beside keeping the entry, metaconceal-install can run
// the readiness gate (pkg/nodegate), the repair of pods without rules (pkg/repair) and
// their Events (pkg/podevents), the datapath self-test (pkg/selftest, reported by
// pkg/nodegate), and serve their metrics. Wiring only.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/kubernetes"

	"github.com/metaconceal/metaconceal/internal/buildinfo/buildmetric"
	"github.com/metaconceal/metaconceal/internal/kubeflags"
	"github.com/metaconceal/metaconceal/pkg/cri"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/repair"
	"github.com/metaconceal/metaconceal/pkg/reuseport"
	"github.com/metaconceal/metaconceal/pkg/selftest"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// agentOptions are the node agent's flags.
type agentOptions struct {
	kube            kubeflags.Flags
	gate            bool
	gateInterval    time.Duration
	gateGrace       time.Duration
	proxyReadyz     string
	guardCheck      bool
	iptablesBackend string
	repair          string
	repairInterval  time.Duration
	criSocket       string
	stateDir        string
	metricsListen   string
	selftestEvery   time.Duration
	selftestReport  bool
	proxy           string // the entry's proxy address (--proxy), asked before each self-test
}

func (a *agentOptions) register(fs *flag.FlagSet) {
	a.kube.Register(fs, "watch mode: on pods found without metadata rules (MetadataUnprotected, MetadataRepaired)")
	fs.BoolVar(&a.gate, "readiness-gate", false, "watch mode: remove the taint "+nodegate.TaintKey+" from this node once the entry is in the CNI config, the proxy is ready and the host guard is installed; put it back when the entry is lost (needs nodes get/patch)")
	fs.DurationVar(&a.gateInterval, "gate-interval", nodegate.DefaultInterval, "readiness gate: how often the checks run")
	fs.DurationVar(&a.gateGrace, "gate-grace", nodegate.DefaultGrace, "readiness gate: how long the entry may be missing before the taint goes back")
	fs.StringVar(&a.proxyReadyz, "proxy-readyz", "http://127.0.0.1:989/readyz", "readiness gate: the proxy's readiness URL (empty: not checked)")
	fs.BoolVar(&a.guardCheck, "check-host-guard", true, "readiness gate: require the proxy's host guard in this netns's iptables rules")
	fs.StringVar(&a.iptablesBackend, "iptables-backend", string(xtables.BackendAuto), "readiness gate: iptables binaries to read the host guard with: auto (iptables on PATH; empty means the same), nft or legacy, as the proxy's")
	fs.StringVar(&a.repair, "repair", string(repair.ModeOff), "watch mode: pods running without metadata rules: repair (install them as ADD would), report (metric, log, Event) or off")
	fs.DurationVar(&a.repairInterval, "repair-interval", repair.DefaultInterval, "repair: how often the node's pod sandboxes are compared with the state records")
	fs.StringVar(&a.criSocket, "cri-socket", "/run/containerd/containerd.sock", "repair: the container runtime's CRI socket")
	fs.StringVar(&a.stateDir, "state-dir", state.DefaultDir, "repair and self-test: the plugin's state dir (repair: when the CNI config holds no entry to name it)")
	fs.DurationVar(&a.selftestEvery, "selftest-interval", selftest.DefaultInterval, "watch mode, with any agent part on: how often the datapath self-test probes the host guard from a concealed pod (condition "+string(nodegate.GuardCondition)+", metaconceal_guard_effective); 0 disables")
	fs.BoolVar(&a.selftestReport, "selftest-report-only", false, "readiness gate: a bypassed guard only reports (condition, Event, metric), even before the gate first opens")
	fs.StringVar(&a.metricsListen, "metrics-listen", "", "watch mode: address:port for the agent's /metrics (metaconceal_unprotected_pods, ...) and /healthz; empty disables")
}

// enabled reports whether any agent part runs.
func (a *agentOptions) enabled() bool {
	return a.gate || a.repair != string(repair.ModeOff) || a.kube.Events || a.metricsListen != ""
}

// validate checks the flags before anything happens; watch says whether the installer
// runs in watch mode (the only mode the agent runs in).
func (a *agentOptions) validate(watch bool) error {
	mode, err := repair.ParseMode(a.repair)
	if err != nil {
		return fmt.Errorf("--repair: %w", err)
	}
	if !watch && a.enabled() {
		return errors.New("--readiness-gate, --repair, --pod-events and --metrics-listen run in watch mode only (not with --once or --uninstall)")
	}
	if (a.gate || a.kube.Events) && a.kube.NodeName == "" {
		return errors.New("--readiness-gate and --pod-events need --node-name (or $" + kubeflags.NodeNameEnv + ")")
	}
	if a.selftestEvery < 0 {
		return errors.New("--selftest-interval must not be negative")
	}
	if a.enabled() && a.selftestEvery > 0 && a.proxy != "" {
		if _, err := netip.ParseAddrPort(a.proxy); err != nil {
			return fmt.Errorf("--proxy: %w", err)
		}
	}
	if mode != repair.ModeOff && a.repairInterval <= 0 {
		return errors.New("--repair-interval must be positive")
	}
	if _, err := xtables.ParseBackend(a.iptablesBackend); err != nil {
		return fmt.Errorf("--iptables-backend: %w", err)
	}
	return nil
}

// runBeside runs keep (the installer's watch loop) and the enabled agent parts until
// ctx is done or keep returns; the parts stop with it.
func (a *agentOptions) runBeside(ctx context.Context, confDir string, log *slog.Logger, keep func(context.Context) error) error {
	if !a.enabled() {
		return keep(ctx)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildmetric.New())

	var client kubernetes.Interface
	var events *podevents.Recorder
	if a.gate || a.kube.Events {
		var err error
		if client, err = a.kube.Client(); err != nil {
			return err
		}
		if events, err = a.kube.Recorder(client, "metaconceal-node-agent", log); err != nil {
			return err
		}
		if events != nil {
			defer events.Close()
		}
	}

	var wg sync.WaitGroup
	errc := make(chan error, 4)
	goRun := func(name string, fn func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}

	if a.metricsListen != "" {
		srv, err := a.metricsServer(ctx, reg, log)
		if err != nil {
			return err
		}
		goRun("metrics", srv)
	}
	var monitor *selftest.Monitor
	if a.selftestEvery > 0 {
		var err error
		if monitor, err = a.newSelftest(client, reg, log); err != nil {
			return err
		}
		goRun("guard self-test", monitor.Run)
	}
	if a.gate {
		gate, err := a.newGate(client, confDir, reg, log, monitor)
		if err != nil {
			return err
		}
		goRun("readiness gate", gate.Run)
	}
	if mode := repair.Mode(a.repair); mode != repair.ModeOff {
		metrics := repair.NewMetrics(reg)
		goRun("repair", func(ctx context.Context) error { return a.runRepair(ctx, mode, confDir, events, metrics, log) })
	}

	err := keep(ctx)
	cancel()
	wg.Wait()
	close(errc)
	for e := range errc {
		err = errors.Join(err, e)
	}
	return err
}

// newSelftest wires the self-test's monitor to its reporter: the node condition and
// Event need the API client (made for --readiness-gate or --pod-events).
func (a *agentOptions) newSelftest(client kubernetes.Interface, reg prometheus.Registerer, log *slog.Logger) (*selftest.Monitor, error) {
	log = log.With("part", "selftest")
	probe := selftest.Config{Backend: xtables.Backend(a.iptablesBackend)}
	if a.proxy != "" {
		probe.Proxy = netip.MustParseAddrPort(a.proxy) // validated
	}
	rep := &nodegate.GuardReporter{Client: client, Node: a.kube.NodeName, Effective: nodegate.NewGuardGauge(reg), Log: log}
	if client == nil {
		log.Info("no API client (--readiness-gate or --pod-events): the self-test reports in the metric, the log and doctor only")
	}
	return selftest.NewMonitor(selftest.MonitorConfig{StateDir: a.stateDir, Interval: a.selftestEvery, Probe: probe, Report: rep.Report, Log: log})
}

func (a *agentOptions) newGate(client kubernetes.Interface, confDir string, reg prometheus.Registerer, log *slog.Logger, monitor *selftest.Monitor) (*nodegate.Gate, error) {
	open := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "metaconceal_readiness_gate_open",
		Help: "1 when the readiness gate removed the " + nodegate.TaintKey + " taint from this node, 0 while it is closed.",
	})
	reg.MustRegister(open)
	checks := []nodegate.Check{{
		Name: "cni-entry", Keep: true,
		Probe: func(context.Context) error { _, err := repair.LoadPluginConf(confDir); return err },
	}}
	if a.proxyReadyz != "" {
		checks = append(checks, nodegate.Check{Name: "proxy-ready", Probe: nodegate.HTTPReady(a.proxyReadyz)})
	}
	if a.guardCheck {
		checks = append(checks, nodegate.Check{Name: "host-guard", Probe: nodegate.HostGuardInstalled(xtables.Backend(a.iptablesBackend))})
	}
	var opened atomic.Bool // the gate opened once: from then on a bypass only reports
	if monitor != nil && !a.selftestReport {
		checks = append(checks, nodegate.GuardCheck(monitor, &opened))
	}
	// After a boot (no marker in the tmpfs state dir) the gate closes the node until
	// it is protected: the kubelet does not taint a Node object that already exists.
	gateLog := log.With("part", "readiness-gate")
	openedBefore, err := nodegate.OpenedSinceBoot(a.stateDir)
	if err != nil {
		gateLog.Warn("cannot tell whether the gate opened since boot; closing the node until it is protected", "err", err)
	}
	return nodegate.New(nodegate.Config{
		Client: client, Node: a.kube.NodeName, Checks: checks, CloseAtStart: !openedBefore,
		Interval: a.gateInterval, Grace: a.gateGrace, Log: gateLog,
		OnChange: func(isOpen bool) {
			if isOpen {
				opened.Store(true)
				open.Set(1)
				if err := nodegate.MarkOpened(a.stateDir); err != nil {
					gateLog.Warn("cannot record that the gate opened; after the agent's next restart it closes the node until protected", "err", err)
				}
			} else {
				open.Set(0)
			}
		},
	})
}

// runRepair connects to the CRI socket (retrying every interval until it answers) and
// runs the repair loop.
func (a *agentOptions) runRepair(ctx context.Context, mode repair.Mode, confDir string, events *podevents.Recorder, m *repair.Metrics, log *slog.Logger) error {
	log = log.With("part", "repair")
	var runtime *cri.Client
	for {
		var err error
		if runtime, err = cri.Dial(ctx, a.criSocket, 10*time.Second); err == nil {
			break
		}
		log.Error("cannot reach the container runtime; retrying", "err", err, "retry", a.repairInterval.String())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(a.repairInterval):
		}
	}
	defer runtime.Close()
	cfg := repair.Config{
		Mode: mode, Sandboxes: runtime, ConfDir: confDir, StateDir: a.stateDir,
		Interval: a.repairInterval, Metrics: m, PluginLog: pluginLogWriter{log}, Log: log,
	}
	if events != nil {
		cfg.Events = events
	}
	r, err := repair.New(cfg)
	if err != nil {
		return err
	}
	log.Info("repair running", "mode", string(mode), "interval", a.repairInterval.String(), "cri", a.criSocket)
	return r.Run(ctx)
}

// pluginLogWriter passes the plugin's own log lines (ADD, DEL of a repair) to the log.
type pluginLogWriter struct{ log *slog.Logger }

func (w pluginLogWriter) Write(p []byte) (int, error) {
	w.log.Info("plugin", "line", string(trimNewline(p)))
	return len(p), nil
}

func trimNewline(p []byte) []byte {
	for len(p) > 0 && (p[len(p)-1] == '\n' || p[len(p)-1] == '\r') {
		p = p[:len(p)-1]
	}
	return p
}

// metricsServer listens now (so a bad address fails at start) and returns the serve loop.
func (a *agentOptions) metricsServer(ctx context.Context, reg *prometheus.Registry, log *slog.Logger) (func(context.Context) error, error) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	// SO_REUSEPORT: the next agent of a rolling update binds beside this one.
	ln, err := reuseport.Listen(ctx, a.metricsListen)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	return func(ctx context.Context) error {
		go func() {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx) // the process is stopping; nothing to report
		}()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}, nil
}
