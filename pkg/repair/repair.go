// Package repair finds pods running on the node without their metadata rules and,
// by setting, installs them after the fact or reports them.
//
// A pod has rules only if its CNI ADD ran while metaconceal was in the node's CNI
// config: pods started before the DaemonSet, or while the main CNI had rewritten its
// config without the entry, have none (only the proxy's host guard covers them). At
// start and every period, the node agent lists the runtime's ready pod sandboxes
// through the CRI socket and compares them with the plugin's state records (one per
// attachment the plugin handled). A sandbox that is ready, not hostNetwork and has no
// record is unprotected. Per Mode:
//
//   - repair: enter its network namespace, install the rules and write the record by
//     running the plugin's own ADD (pkg/cniplugin) with the arguments the runtime would
//     have passed (the sandbox id, its netns, eth0, the pod from the sandbox metadata);
//     then confirm the sandbox still runs, and undo with the plugin's DEL if it does not.
//   - report: count it in the unprotected-pods gauge, log it and put a Warning Event on
//     the pod, nothing else.
//   - off: do nothing.
package repair

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/cniplugin"
	"github.com/metaconceal/metaconceal/pkg/podevents"
	"github.com/metaconceal/metaconceal/pkg/state"

	"github.com/metaconceal/metaconceal/pkg/cri"
)

// Mode says what to do with an unprotected pod.
type Mode string

const (
	ModeRepair Mode = "repair"
	ModeReport Mode = "report"
	ModeOff    Mode = "off"
)

// ParseMode checks a --repair value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeRepair, ModeReport, ModeOff:
		return m, nil
	}
	return "", fmt.Errorf("repair: mode %q: want repair, report or off", s)
}

// DefaultInterval is the repair period.
const DefaultInterval = 30 * time.Second

// Sandbox is one pod sandbox as the runtime reports it (pkg/cri).
type Sandbox = cri.Sandbox

// Sandboxes is where the sandboxes come from; *cri.Client is the real one.
type Sandboxes interface {
	ReadySandboxes(ctx context.Context) ([]Sandbox, error)
	Sandbox(ctx context.Context, id string) (Sandbox, bool, error)
}

// EventSink records Events on pods; *podevents.Recorder implements it.
type EventSink interface {
	Emit(pod podevents.Pod, eventType, reason, message string)
}

// Config configures a Repairer.
type Config struct {
	Mode      Mode
	Sandboxes Sandboxes
	// ConfDir is the node's CNI conf dir: the metaconceal entry of its primary config
	// is what the repair's ADD runs with.
	ConfDir string
	// StateDir is read for records when the config holds no entry (report, gauge);
	// with an entry, the entry's stateDir is used, as the plugin does.
	StateDir string
	// IfName is the interface name of the pod's network (DefaultIfName).
	IfName   string
	Interval time.Duration
	Events   EventSink // nil: no Events
	Metrics  *Metrics  // nil: a private, unregistered set
	// PluginLog receives the plugin's own log lines (ADD/DEL); nil discards them.
	PluginLog io.Writer
	Log       *slog.Logger
}

// Repairer scans the node; Scan and Run must not be called concurrently.
type Repairer struct {
	cfg Config
	log *slog.Logger
	m   *Metrics
}

// New validates cfg.
func New(cfg Config) (*Repairer, error) {
	if _, err := ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.Mode != ModeOff && cfg.Sandboxes == nil {
		return nil, errors.New("repair: no CRI connection")
	}
	if cfg.ConfDir == "" {
		return nil, errors.New("repair: no CNI conf dir")
	}
	if cfg.StateDir == "" {
		cfg.StateDir = state.DefaultDir
	}
	if cfg.IfName == "" {
		cfg.IfName = DefaultIfName
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.PluginLog == nil {
		cfg.PluginLog = io.Discard
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Repairer{cfg: cfg, log: log.With("repair", string(cfg.Mode)), m: m}, nil
}

// Result is what one scan found and did.
type Result struct {
	Sandboxes   int       // ready sandboxes seen
	Unprotected []Sandbox // still without rules after the scan (what the gauge shows)
	Repaired    []Sandbox
	Failed      []Sandbox // repair attempted and failed (also in Unprotected)
}

// Run scans at once and then every Interval until ctx is done.
func (r *Repairer) Run(ctx context.Context) error {
	if r.cfg.Mode == ModeOff {
		r.log.Info("repair is off: pods without rules are neither repaired nor reported")
		return nil
	}
	t := time.NewTicker(r.cfg.Interval)
	defer t.Stop()
	for {
		if _, err := r.Scan(ctx); err != nil && ctx.Err() == nil {
			r.log.Error("repair scan incomplete", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Scan looks at every ready sandbox once and repairs or reports those without a record.
func (r *Repairer) Scan(ctx context.Context) (Result, error) {
	var res Result
	if r.cfg.Mode == ModeOff {
		return res, nil
	}
	complete := false
	defer func() {
		// Only a scan that saw every sandbox and record may say how many pods are
		// unprotected: an incomplete one leaves the gauge and the timestamp as they
		// were, so the stall alert fires instead of a false all-clear.
		if complete {
			r.m.unprotected.Set(float64(len(res.Unprotected)))
			r.m.lastScan.SetToCurrentTime()
		}
	}()
	pc, confErr := LoadPluginConf(r.cfg.ConfDir)
	stateDir := r.cfg.StateDir
	if confErr == nil {
		stateDir = pc.Conf.StateDir
	}
	sandboxes, listErr := r.cfg.Sandboxes.ReadySandboxes(ctx)
	records, recErr := state.List(stateDir)
	res.Sandboxes = len(sandboxes)
	var errs []error
	if recErr != nil {
		// A record that cannot be read makes its pod look unprotected: a repair then
		// runs ADD, which reconciles the rules and rewrites the record (as a repeated
		// ADD does); the gauge waits for a complete scan.
		r.m.scanErrors.Inc()
		errs = append(errs, fmt.Errorf("repair: read state records: %w", recErr))
	}
	if listErr != nil {
		r.m.scanErrors.Inc()
		errs = append(errs, listErr)
	}
	complete = listErr == nil && recErr == nil
	for _, sb := range Unprotected(sandboxes, records) {
		// A pod the config leaves exposed on purpose (mode, excluded namespace) is not
		// unprotected; a repair still writes its exposed record, as ADD would.
		wants := pc == nil || (pc.Conf.Mode.Conceals() && !pc.Conf.Excluded(sb.Namespace))
		switch {
		case r.cfg.Mode == ModeReport:
			if !wants {
				continue
			}
			r.m.count("reported")
			r.log.Warn("pod runs without metadata rules (repair=report)", "pod", sb.String(), "sandbox", sb.ID, "ips", sb.IPs)
			r.event(sb, corev1.EventTypeWarning, podevents.ReasonUnprotected,
				"pod runs without metadata concealment rules (it started before metaconceal was in the node's CNI config); restart it, or run the node agent with --repair=repair")
			res.Unprotected = append(res.Unprotected, sb)
		case confErr != nil:
			r.m.count("failed")
			res.Failed = append(res.Failed, sb)
			errs = append(errs, fmt.Errorf("repair %s: %w", sb, confErr))
			r.log.Error("pod runs without metadata rules and cannot be repaired", "pod", sb.String(), "err", confErr)
			if wants {
				r.event(sb, corev1.EventTypeWarning, podevents.ReasonUnprotected,
					fmt.Sprintf("pod runs without metadata concealment rules and cannot be repaired: %v", confErr))
				res.Unprotected = append(res.Unprotected, sb)
			}
		default:
			began := time.Now()
			done, err := r.repairOne(ctx, pc, sb)
			switch {
			case err != nil:
				r.m.count("failed")
				res.Failed = append(res.Failed, sb)
				errs = append(errs, err)
				r.log.Error("repair failed", "pod", sb.String(), "err", err)
				if wants {
					r.event(sb, corev1.EventTypeWarning, podevents.ReasonUnprotected,
						fmt.Sprintf("pod runs without metadata concealment rules; repair failed: %v", err))
					res.Unprotected = append(res.Unprotected, sb)
				}
			case !done:
				r.log.Info("sandbox went away during its repair; undone", "pod", sb.String())
			default:
				r.m.count("repaired")
				res.Repaired = append(res.Repaired, sb)
				r.log.Warn("pod was running without metadata rules; repaired", "pod", sb.String(), "sandbox", sb.ID, "ips", sb.IPs,
					"exposedByConfig", !wants, "duration", time.Since(began).String())
				if wants {
					r.event(sb, corev1.EventTypeNormal, podevents.ReasonRepaired,
						"metadata concealment rules installed by the metaconceal node agent: the pod had started without them")
				}
			}
		}
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
	}
	r.log.Debug("repair scan", "sandboxes", res.Sandboxes, "records", len(records), "unprotected", len(res.Unprotected), "repaired", len(res.Repaired))
	return res, errors.Join(errs...)
}

// Unprotected returns the ready, non-hostNetwork sandboxes that no record names (by
// sandbox id, whatever the interface): those whose ADD never ran with metaconceal.
func Unprotected(sandboxes []Sandbox, records []state.Record) []Sandbox {
	recorded := make(map[string]bool, len(records))
	for _, rec := range records {
		recorded[rec.ContainerID] = true
	}
	var out []Sandbox
	for _, sb := range sandboxes {
		if sb.Ready && !sb.HostNetwork && !recorded[sb.ID] {
			out = append(out, sb)
		}
	}
	return out
}

// repairOne runs the plugin's ADD for sb; done is false when the sandbox was gone by
// the end and the ADD was undone with the plugin's DEL.
func (r *Repairer) repairOne(ctx context.Context, pc *PluginConf, sb Sandbox) (done bool, err error) {
	if sb.Netns == "" {
		return false, fmt.Errorf("repair %s: the runtime reports no network namespace path", sb)
	}
	if len(sb.IPs) == 0 {
		return false, fmt.Errorf("repair %s: the runtime reports no pod IP", sb)
	}
	// The host-side veth, as the main plugin's result would have named it: the plugin
	// records it so that the proxy can tell an exposed pod's IP from a spoofed one.
	hostIf, err := HostVeth(sb.Netns, r.cfg.IfName)
	if err != nil {
		r.log.Warn("cannot find the pod's host-side interface; its record will not name one", "pod", sb.String(), "err", err)
		hostIf = ""
	}
	args, err := pc.AddArgs(sb, r.cfg.IfName, hostIf)
	if err != nil {
		return false, err
	}
	plugin := &cniplugin.Plugin{Stdout: io.Discard, Stderr: r.cfg.PluginLog}
	if err := plugin.Add(args); err != nil {
		return false, fmt.Errorf("repair %s: the plugin's ADD: %w", sb, err)
	}
	// The pod may have been deleted while we worked (its DEL ran before our ADD wrote
	// the record): then undo, exactly as its DEL would have.
	cur, found, err := r.cfg.Sandboxes.Sandbox(ctx, sb.ID)
	if err != nil {
		return true, fmt.Errorf("repair %s: confirm the sandbox still runs: %w (rules and record kept)", sb, err)
	}
	if found && cur.Ready {
		return true, nil
	}
	delArgs := *args
	if err := plugin.Del(&delArgs); err != nil {
		return false, fmt.Errorf("repair %s: the sandbox went away; undoing with the plugin's DEL: %w", sb, err)
	}
	return false, nil
}

func (r *Repairer) event(sb Sandbox, eventType, reason, message string) {
	if r.cfg.Events == nil {
		return
	}
	r.cfg.Events.Emit(podevents.Pod{Namespace: sb.Namespace, Name: sb.Name, UID: sb.UID}, eventType, reason, message)
}

// Metrics are the repair's Prometheus series.
type Metrics struct {
	unprotected prometheus.Gauge
	lastScan    prometheus.Gauge
	scanErrors  prometheus.Counter
	pods        *prometheus.CounterVec
}

// NewMetrics creates the series and registers them in reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		unprotected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "metaconceal_unprotected_pods",
			Help: "Ready, non-hostNetwork pods on this node that have no metadata rules (no state record) after the last repair scan, excluding pods the config leaves exposed on purpose. Alert when above 0.",
		}),
		lastScan: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "metaconceal_repair_last_scan_timestamp_seconds",
			Help: "When the last complete repair scan (every sandbox and record read) ended (Unix time).",
		}),
		scanErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metaconceal_repair_scan_errors_total",
			Help: "Repair scans that could not list sandboxes or state records.",
		}),
		pods: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metaconceal_repair_pods_total",
			Help: "Pods found without metadata rules, by what was done: repaired, reported or failed.",
		}, []string{"result"}),
	}
	for _, r := range []string{"repaired", "reported", "failed"} {
		m.pods.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.unprotected, m.lastScan, m.scanErrors, m.pods)
	}
	return m
}

func (m *Metrics) count(result string) { m.pods.WithLabelValues(result).Inc() }
