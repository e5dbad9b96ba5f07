// Package nodegate keeps a node closed to ordinary pods until metaconceal protects it.
//
// The node carries the taint metaconceal.io/not-ready=:NoSchedule from registration
// (kubelet --register-with-taints, GKE --node-taints). The node agent removes it from
// its own node once every check passes (the plugin is in the CNI config, the proxy
// answers /readyz, the host guard is installed), and puts it back when a check marked
// Keep (the CNI entry) has failed for longer than Grace, i.e. the entry disappeared and
// the installer could not restore it. Only Keep checks are evaluated once the gate is
// open: a metadata server that blips must not close every node of a cluster.
//
// The taint is changed with a JSON merge patch of spec.taints that carries the node's
// resourceVersion, so a concurrent change of the taints (kubelet, the node lifecycle
// controller, an operator) is never overwritten: the patch conflicts and is retried on
// a fresh read. The agent needs nodes get and patch, nothing else.
package nodegate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// TaintKey is the readiness taint's key; its effect is NoSchedule and its value empty.
const TaintKey = "metaconceal.io/not-ready"

// Taint is the readiness taint as a node carries it.
var Taint = corev1.Taint{Key: TaintKey, Effect: corev1.TaintEffectNoSchedule}

// Defaults of Config fields left zero.
const (
	DefaultInterval = 2 * time.Second
	DefaultGrace    = 30 * time.Second
	DefaultResync   = 5 * time.Minute
)

// Check is one condition of the gate.
type Check struct {
	Name  string
	Probe func(ctx context.Context) error
	// Keep: while the gate is open this check is still evaluated, and failing it for
	// longer than Config.Grace puts the taint back.
	Keep bool
}

// Config configures a Gate.
type Config struct {
	Client kubernetes.Interface
	Node   string
	Checks []Check
	// Interval between evaluations of the checks.
	Interval time.Duration
	// Grace is how long a Keep check may fail before the taint goes back.
	Grace time.Duration
	// Resync is how often an open gate reads the node to remove a taint put back by
	// someone else (a node re-registered with --register-with-taints).
	Resync time.Duration
	// CloseAtStart: the first step that finds a check failing puts the taint on
	// instead of only learning whether the node carries it. The node agent sets it
	// after a boot (its marker in the tmpfs state dir is gone): the kubelet applies
	// --register-with-taints only when it creates the Node object, so a rebooted node
	// would otherwise stay open to new pods until metaconceal protects it again.
	CloseAtStart bool
	// OnChange, when set, is called with the gate's state after each change.
	OnChange func(open bool)
	Log      *slog.Logger
}

// Gate is the readiness gate of one node. Step and Run must not be called concurrently.
type Gate struct {
	cfg Config
	log *slog.Logger

	open        bool
	known       bool      // open reflects what the API said (after the first step)
	keepFailing time.Time // when a Keep check began failing; zero while they pass
	lastSync    time.Time
	now         func() time.Time
}

// New validates cfg and returns a Gate.
func New(cfg Config) (*Gate, error) {
	if cfg.Client == nil {
		return nil, errors.New("nodegate: no API client")
	}
	if cfg.Node == "" {
		return nil, errors.New("nodegate: no node name (set it from the downward API: spec.nodeName)")
	}
	if len(cfg.Checks) == 0 {
		return nil, errors.New("nodegate: no checks: the gate would open on nothing")
	}
	for i, c := range cfg.Checks {
		if c.Name == "" || c.Probe == nil {
			return nil, fmt.Errorf("nodegate: check %d has no name or probe", i)
		}
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Grace <= 0 {
		cfg.Grace = DefaultGrace
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Gate{cfg: cfg, log: log.With("node", cfg.Node), now: time.Now}, nil
}

// Open reports whether the gate was open after the last step.
func (g *Gate) Open() bool { return g.open }

// Run evaluates the gate every Interval until ctx is done. API errors are logged and
// retried at the next step; the taint is never removed on an error.
func (g *Gate) Run(ctx context.Context) error {
	t := time.NewTicker(g.cfg.Interval)
	defer t.Stop()
	for {
		if err := g.Step(ctx); err != nil && ctx.Err() == nil {
			g.log.Error("readiness gate step failed; retrying", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Step evaluates the checks once and changes the taint when the outcome says so.
func (g *Gate) Step(ctx context.Context) error {
	now := g.now()
	var failed, keepFailed []string
	for _, c := range g.cfg.Checks {
		if g.open && g.known && !c.Keep {
			continue // an open gate only watches what can close it
		}
		if err := c.Probe(ctx); err != nil {
			failed = append(failed, c.Name)
			g.log.Debug("readiness check failed", "check", c.Name, "err", err)
			if c.Keep {
				keepFailed = append(keepFailed, c.Name+": "+err.Error())
			}
		}
	}
	if len(keepFailed) == 0 {
		g.keepFailing = time.Time{}
	} else if g.keepFailing.IsZero() {
		g.keepFailing = now
	}

	switch {
	case len(keepFailed) > 0 && now.Sub(g.keepFailing) >= g.cfg.Grace:
		if g.known && !g.open && now.Sub(g.lastSync) < g.cfg.Resync {
			return nil // already tainted by us
		}
		g.log.Warn("metaconceal cannot keep protecting new pods on this node; tainting it", "failing", keepFailed, "for", now.Sub(g.keepFailing).Round(time.Second).String())
		changed, err := g.setTaint(ctx, true)
		if err != nil {
			return err
		}
		g.set(false, changed, now)
	case len(failed) == 0:
		if g.known && g.open && now.Sub(g.lastSync) < g.cfg.Resync {
			return nil
		}
		changed, err := g.setTaint(ctx, false)
		if err != nil {
			return err
		}
		if changed || !g.known {
			g.log.Info("readiness gate open: plugin in the CNI config, proxy ready, host guard installed", "taintRemoved", changed)
		}
		g.set(true, changed, now)
	case !g.known && g.cfg.CloseAtStart:
		g.log.Warn("metaconceal does not protect this node yet since it booted; tainting it until it does", "failing", failed)
		changed, err := g.setTaint(ctx, true)
		if err != nil {
			return err
		}
		g.set(false, changed, now)
	default:
		if !g.known {
			// Learn whether the node is tainted, so Open says the truth before the
			// checks pass; nothing is changed.
			tainted, err := g.tainted(ctx)
			if err != nil {
				return err
			}
			g.set(!tainted, false, now)
		}
		g.log.Debug("readiness gate waiting", "failing", failed)
	}
	return nil
}

func (g *Gate) set(open, changed bool, now time.Time) {
	prev := g.open
	g.open, g.known, g.lastSync = open, true, now
	if g.cfg.OnChange != nil && (changed || prev != open) {
		g.cfg.OnChange(open)
	}
}

func (g *Gate) tainted(ctx context.Context) (bool, error) {
	node, err := g.cfg.Client.CoreV1().Nodes().Get(ctx, g.cfg.Node, metav1.GetOptions{})
	if err != nil {
		return false, fmt.Errorf("nodegate: get node %s: %w", g.cfg.Node, err)
	}
	return HasTaint(node.Spec.Taints), nil
}

// setTaint adds (want true) or removes the taint and reports whether the node changed.
func (g *Gate) setTaint(ctx context.Context, want bool) (bool, error) {
	changed := false
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		nodes := g.cfg.Client.CoreV1().Nodes()
		node, err := nodes.Get(ctx, g.cfg.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		taints, ok := WithTaint(node.Spec.Taints, want)
		if !ok {
			changed = false
			return nil
		}
		patch, err := TaintPatch(node.ResourceVersion, taints)
		if err != nil {
			return err
		}
		if _, err := nodes.Patch(ctx, g.cfg.Node, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "metaconceal-node-agent"}); err != nil {
			return err
		}
		changed = true
		return nil
	})
	if err != nil {
		verb := "remove"
		if want {
			verb = "add"
		}
		if apierrors.IsForbidden(err) {
			return false, fmt.Errorf("nodegate: %s taint %s on node %s: %w (the service account needs nodes get and patch; see conf/deploy/rbac.yaml)", verb, TaintKey, g.cfg.Node, err)
		}
		return false, fmt.Errorf("nodegate: %s taint %s on node %s: %w", verb, TaintKey, g.cfg.Node, err)
	}
	return changed, nil
}

// HasTaint reports whether taints hold the readiness taint (any value).
func HasTaint(taints []corev1.Taint) bool {
	return slices.ContainsFunc(taints, isOurs)
}

func isOurs(t corev1.Taint) bool {
	return t.Key == TaintKey && t.Effect == corev1.TaintEffectNoSchedule
}

// WithTaint returns taints with the readiness taint present (want) or absent, keeping
// every other taint in its place; ok is false when nothing changes.
func WithTaint(taints []corev1.Taint, want bool) (out []corev1.Taint, ok bool) {
	if HasTaint(taints) == want {
		return taints, false
	}
	if want {
		return append(slices.Clone(taints), Taint), true
	}
	return slices.DeleteFunc(slices.Clone(taints), isOurs), true
}

// TaintPatch is the JSON merge patch that sets spec.taints to taints, conditional on
// resourceVersion (the API server answers 409 Conflict if the node changed since).
func TaintPatch(resourceVersion string, taints []corev1.Taint) ([]byte, error) {
	if resourceVersion == "" {
		return nil, errors.New("nodegate: no resourceVersion to make the patch conditional on")
	}
	var spec any = map[string]any{"taints": taints}
	if len(taints) == 0 {
		spec = map[string]any{"taints": nil} // merge patch: null deletes the field
	}
	return json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": resourceVersion},
		"spec":     spec,
	})
}
