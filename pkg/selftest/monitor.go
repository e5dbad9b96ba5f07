package selftest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/metaconceal/metaconceal/internal/fsutil"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// State is the node's guard state as the node agent reports it (node condition
// MetadataConcealmentGuard, gauge metaconceal_guard_effective).
type State string

const (
	StateEffective State = "Effective" // the last probe reached the proxy (or nothing)
	StateBypassed  State = "Bypassed"  // the last probe reached a server that is not the proxy
	StateNotTested State = "NotTested" // no concealed pod to probe from, or the probe could not run
)

// DefaultInterval is the node agent's default time between probes.
const DefaultInterval = 60 * time.Second

// OutcomeFile is where, in the state dir, the node agent keeps the last outcome (for
// `metaconceal-proxy doctor`); the leading dot keeps it out of state.List.
const OutcomeFile = ".guard-selftest.json"

// Outcome is one round of the node agent's self-test.
type Outcome struct {
	State State `json:"state"`
	// Pod is the pod probed from (namespace/name, or the container id without one).
	Pod     string  `json:"pod,omitempty"`
	Verdict Verdict `json:"verdict,omitempty"`
	// Status is the status line of the answer, Detail why nothing answered or why
	// nothing was tested.
	Status string        `json:"status,omitempty"`
	Detail string        `json:"detail,omitempty"`
	At     time.Time     `json:"at"`
	Took   time.Duration `json:"took"`
}

// Message is the outcome in one sentence (condition message, log, doctor).
func (o Outcome) Message() string {
	switch o.State {
	case StateEffective:
		if o.Verdict == Blocked {
			return fmt.Sprintf("a raw-socket request from pod %s to the metadata server was dropped or reset before reaching any server (%s)", o.Pod, o.Detail)
		}
		return fmt.Sprintf("a raw-socket request from pod %s to the metadata server reached the metaconceal proxy", o.Pod)
	case StateBypassed:
		return fmt.Sprintf("a raw-socket request from pod %s to the metadata server went around the host guard (answer %q, not the proxy's); see docs/datapath.md", o.Pod, o.Status)
	default:
		return "not tested: " + o.Detail
	}
}

// PodName names a record's pod for outcomes.
func PodName(r state.Record) string {
	if r.PodNamespace != "" && r.PodName != "" {
		return r.PodNamespace + "/" + r.PodName
	}
	return r.ContainerID
}

// Candidates are the records a probe may run from: concealed attachments with an
// IPv4 address whose netns still exists, in a stable order (by key).
func Candidates(records []state.Record) []state.Record {
	var out []state.Record
	for _, r := range records {
		if r.Exposed || r.Netns == "" || r.IfName == "" || !slices.ContainsFunc(r.IPs, isIPv4) {
			continue
		}
		if _, err := os.Stat(r.Netns); err != nil {
			continue
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b state.Record) int {
		switch {
		case a.Key() < b.Key():
			return -1
		case a.Key() > b.Key():
			return 1
		}
		return 0
	})
	return out
}

func isIPv4(s string) bool {
	for _, c := range s {
		if c == ':' {
			return false
		}
	}
	return s != ""
}

// MonitorConfig configures a Monitor.
type MonitorConfig struct {
	StateDir string
	Interval time.Duration
	// Probe is the template of each probe; Netns and IfName come from the record.
	Probe Config
	// Tries is how many pods one round tries when probes fail to run (default 3).
	Tries int
	// Report, when set, gets every outcome (from the Run goroutine).
	Report func(context.Context, Outcome)
	// RunProbe replaces Run (tests).
	RunProbe func(context.Context, Config) (Result, error)
	Log      *slog.Logger
}

// Monitor runs the self-test periodically from the node's concealed pods.
type Monitor struct {
	cfg  MonitorConfig
	log  *slog.Logger
	mu   sync.Mutex
	last *Outcome
}

// NewMonitor validates cfg.
func NewMonitor(cfg MonitorConfig) (*Monitor, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("selftest: no state dir")
	}
	if cfg.Interval <= 0 {
		return nil, errors.New("selftest: the interval must be positive")
	}
	if cfg.Tries <= 0 {
		cfg.Tries = 3
	}
	if cfg.RunProbe == nil {
		cfg.RunProbe = Run
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Monitor{cfg: cfg, log: log}, nil
}

// Last returns the last outcome; ok is false before the first round ended.
func (m *Monitor) Last() (o Outcome, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.last == nil {
		return Outcome{}, false
	}
	return *m.last, true
}

// Run runs a round at once, then every Interval, until ctx is done.
func (m *Monitor) Run(ctx context.Context) error {
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		o := m.Step(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if m.cfg.Report != nil {
			m.cfg.Report(ctx, o)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Step runs one round: a probe from the first candidate pod that it can run in.
func (m *Monitor) Step(ctx context.Context) Outcome {
	start := time.Now()
	o := m.round(ctx)
	o.At, o.Took = start, time.Since(start)
	prev, had := m.Last()
	m.mu.Lock()
	m.last = &o
	m.mu.Unlock()
	level := slog.LevelDebug
	if !had || prev.State != o.State {
		level = slog.LevelInfo
	}
	if o.State == StateBypassed {
		level = slog.LevelError
	}
	m.log.Log(ctx, level, "guard self-test", "state", string(o.State), "pod", o.Pod, "message", o.Message(), "took", o.Took.String())
	if err := WriteOutcome(m.cfg.StateDir, o); err != nil {
		m.log.Warn("cannot keep the self-test outcome for doctor", "err", err)
	}
	return o
}

func (m *Monitor) round(ctx context.Context) Outcome {
	records, err := state.List(m.cfg.StateDir)
	cands := Candidates(records)
	if len(cands) == 0 {
		detail := "no concealed pod runs on this node yet"
		if err != nil {
			detail += fmt.Sprintf(" (state dir: %v)", err)
		}
		return Outcome{State: StateNotTested, Detail: detail}
	}
	var errs []error
	for _, r := range cands[:min(len(cands), m.cfg.Tries)] {
		cfg := m.cfg.Probe
		cfg.Netns, cfg.IfName = r.Netns, r.IfName
		res, err := m.cfg.RunProbe(ctx, cfg)
		if err != nil {
			m.log.Debug("self-test could not run from this pod", "pod", PodName(r), "err", err)
			errs = append(errs, fmt.Errorf("%s: %w", PodName(r), err))
			continue
		}
		o := Outcome{Pod: PodName(r), Verdict: res.Verdict, Status: res.Status, Detail: res.Detail, State: StateEffective}
		if !res.Verdict.Guarded() {
			o.State = StateBypassed
		}
		return o
	}
	return Outcome{State: StateNotTested, Detail: "the probe could not run: " + errors.Join(errs...).Error()}
}

// WriteOutcome keeps o in dir (atomically replaced).
func WriteOutcome(dir string, o Outcome) error {
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("selftest: %w", err)
	}
	return fsutil.ReplaceFile(filepath.Join(dir, OutcomeFile), OutcomeFile+".*", 0o644, func(f *os.File) error {
		_, err := f.Write(b)
		return err
	})
}

// RemoveOutcome removes the outcome kept in dir, if any (uninstall: nothing of the
// project stays on the node).
func RemoveOutcome(dir string) (removed bool, err error) {
	err = os.Remove(filepath.Join(dir, OutcomeFile))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("selftest: %w", err)
	}
	return true, nil
}

// ReadOutcome reads the outcome the node agent kept in dir; ok is false when there is none.
func ReadOutcome(dir string) (o Outcome, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, OutcomeFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Outcome{}, false, nil
	}
	if err != nil {
		return Outcome{}, false, fmt.Errorf("selftest: %w", err)
	}
	if err := json.Unmarshal(b, &o); err != nil {
		return Outcome{}, false, fmt.Errorf("selftest: %s: %w", filepath.Join(dir, OutcomeFile), err)
	}
	return o, true, nil
}
