// Package cniplugin implements the verbs of the metaconceal chained CNI plugin: ADD,
// DEL, CHECK, GC and STATUS. plugins/metaconceal wires them into skel; tests call them
// in-process with a skel.CmdArgs.
package cniplugin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/metaconceal/metaconceal/pkg/netconf"
	"github.com/metaconceal/metaconceal/pkg/redirect"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// About is printed by the VERSION verb and by running the binary without CNI_COMMAND.
const About = "metaconceal: chained CNI plugin that redirects a pod's GCE metadata traffic to the concealing proxy"

// SupportedVersions are the CNI spec versions the plugin speaks. skel dispatches CHECK
// from 0.4.0 and GC and STATUS from 1.1.0.
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// statusDialTimeout bounds STATUS: runtimes call it often and a node-local listener
// answers in microseconds.
const statusDialTimeout = time.Second

// iptablesTimeout bounds the iptables processes of one verb.
const iptablesTimeout = 60 * time.Second

// Plugin carries the plugin's outputs; the zero value writes the result to os.Stdout
// and logs to os.Stderr.
type Plugin struct {
	Stdout io.Writer
	Stderr io.Writer

	// lastRunner is the iptables runner of the last verb that made one (DEL and GC
	// make none), for tests that count processes; runnerHook, when set, adjusts a new
	// runner (tests inject failures).
	lastRunner *xtables.Runner
	runnerHook func(*xtables.Runner)
}

// Funcs returns the verbs for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, GC: p.GC, Status: p.Status}
}

func (p *Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}

// logger logs to stderr and, when configured, appends to logFile. A log file that
// cannot be opened is reported on stderr and does not fail the verb.
func (p *Plugin) logger(conf *netconf.Config, verb string, args *skel.CmdArgs) (*slog.Logger, func()) {
	var w io.Writer = os.Stderr
	if p.Stderr != nil {
		w = p.Stderr
	}
	closeFn := func() {}
	var openErr error
	if conf != nil && conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			openErr = err
		} else {
			w = io.MultiWriter(w, f)
			closeFn = func() { _ = f.Close() } // append-only log; a close error loses nothing we could report
		}
	}
	log := slog.New(slog.NewTextHandler(w, nil)).With("plugin", "metaconceal", "verb", verb)
	if args != nil {
		log = log.With("containerID", args.ContainerID, "ifname", args.IfName, "netns", args.Netns)
	}
	if openErr != nil {
		log.Warn("cannot open logFile; logging to stderr only", "logFile", conf.LogFile, "err", openErr)
	}
	return log, closeFn
}

// newRunner returns the iptables runner of one verb. Every process it starts has
// exited when the verb returns.
func (p *Plugin) newRunner(conf *netconf.Config) *xtables.Runner {
	r := xtables.NewRunner(conf.IptablesBackend)
	if p.runnerHook != nil {
		p.runnerHook(r)
	}
	p.lastRunner = r
	return r
}

func attachment(args *skel.CmdArgs) redirect.Attachment {
	return redirect.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}
}

// spec returns the rules of one family for conf; Metadata is empty when the config
// lists no address of that family.
func spec(conf *netconf.Config, family xtables.Family, att redirect.Attachment) redirect.Spec {
	if family == xtables.IPv6 {
		return redirect.Spec{Family: family, Attachment: att, Metadata: conf.Metadata6, Proxy: conf.Proxy6Addr, ALTS: conf.ALTS6Addr}
	}
	return redirect.Spec{Family: family, Attachment: att, Metadata: conf.Metadata4, Proxy: conf.ProxyAddr, ALTS: conf.ALTSAddr}
}

// wantedSpecs are the families ADD installs: IPv4 when there is an IPv4 metadata
// address, IPv6 only when the pod also has an IPv6 address.
func wantedSpecs(conf *netconf.Config, att redirect.Attachment, podIPs []netip.Addr) []redirect.Spec {
	var out []redirect.Spec
	if len(conf.Metadata4) > 0 {
		out = append(out, spec(conf, xtables.IPv4, att))
	}
	if len(conf.Metadata6) > 0 && slices.ContainsFunc(podIPs, func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }) {
		out = append(out, spec(conf, xtables.IPv6, att))
	}
	return out
}

// parsePrevResult requires and converts the previous plugin's result.
func parsePrevResult(conf *netconf.Config) (*current.Result, error) {
	if conf.RawPrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "metaconceal: must be called as a chained plugin (no prevResult)", "")
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "metaconceal: cannot parse prevResult", err.Error())
	}
	res, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "metaconceal: cannot convert prevResult", err.Error())
	}
	return res, nil
}

func podIPs(res *current.Result) []netip.Addr {
	var out []netip.Addr
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// Add installs the attachment's rules in the pod netns, writes its state record and
// passes prevResult through.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	start := time.Now()
	conf, err := netconf.Parse(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "ADD", args)
	defer closeLog()
	prev, err := parsePrevResult(conf)
	if err != nil {
		return err
	}
	// prevResult goes out unchanged, in the conf's version (what types.PrintResult does,
	// to a writer that tests can capture); converted before anything changes, so that a
	// conversion failure leaves nothing behind.
	result, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, "metaconceal: cannot convert prevResult to cniVersion "+conf.CNIVersion, err.Error())
	}
	passThrough := func() error { return result.PrintTo(p.stdout()) }
	pod := netconf.ParsePodArgs(args.Args)
	log = log.With("podNamespace", pod.Namespace, "podName", pod.Name, "mode", conf.Mode)

	att := attachment(args)
	ips := podIPs(prev)
	rec := record(conf, args, pod, prev)
	if reason := rec.ExposedReason; rec.Exposed {
		// No rules, but a record that says so: with the proxy's host guard on, this
		// pod's metadata traffic reaches the proxy anyway, which serves it in full only
		// because of this record (and only through rec.HostIf, against spoofing).
		if err := state.Write(conf.StateDir, rec); err != nil {
			log.Error("ADD failed writing state record", "err", err)
			return types.NewError(types.ErrIOFailure, "metaconceal: cannot write state record", err.Error())
		}
		log.Info(reason+"; nothing installed, pod recorded as exposed", "podIPs", rec.IPs)
		return passThrough()
	}

	specs := wantedSpecs(conf, att, ips)
	// Without a record this attachment has no rules yet (the common case): one restore
	// creates them. A record, or one that cannot be read, means they may exist. So may
	// the rules of an earlier ADD whose DEL left them to the netns (DEL removes only the
	// record): then the fast path's -N fails and Apply reconciles from a snapshot.
	_, readErr := state.Read(conf.StateDir, args.ContainerID, args.IfName)
	mayExist := !errors.Is(readErr, state.ErrNotFound)
	runner := p.newRunner(conf)
	ctx, cancel := context.WithTimeout(context.Background(), iptablesTimeout)
	defer cancel()

	err = ns.WithNetNSPath(args.Netns, func(ns.NetNS) error {
		var applied []redirect.Spec
		for _, s := range specs {
			if err := redirect.Apply(ctx, runner, s, mayExist); err != nil {
				// iptables-restore commits table by table, so the failed family may be
				// half in place: roll it back too (Remove inspects what is there).
				return errors.Join(fmt.Errorf("install %s rules: %w", s.Family, err), rollback(ctx, runner, append(applied, s)))
			}
			applied = append(applied, s)
		}
		if mayExist && len(conf.Metadata6) > 0 && !slices.ContainsFunc(specs, func(s redirect.Spec) bool { return s.Family == xtables.IPv6 }) {
			// A repeated ADD whose pod lost its IPv6 address: drop IPv6 rules of earlier ADDs.
			if _, err := redirect.Remove(ctx, runner, spec(conf, xtables.IPv6, att), false); err != nil {
				return errors.Join(fmt.Errorf("remove stale IPv6 rules: %w", err), rollback(ctx, runner, applied))
			}
		}
		return nil
	})
	if err != nil {
		log.Error("ADD failed", "err", err, "iptables", runner.CountsString())
		return types.NewError(types.ErrInternal, "metaconceal: cannot install metadata redirect rules", err.Error())
	}

	if err := state.Write(conf.StateDir, rec); err != nil {
		rbErr := ns.WithNetNSPath(args.Netns, func(ns.NetNS) error { return rollback(ctx, runner, specs) })
		log.Error("ADD failed writing state record; rules rolled back", "err", err, "rollbackErr", rbErr, "iptables", runner.CountsString())
		return types.NewError(types.ErrIOFailure, "metaconceal: cannot write state record", errors.Join(err, rbErr).Error())
	}
	log.Info("metadata concealed", "families", len(specs), "podIPs", rec.IPs, "repeat", mayExist,
		"iptables", runner.CountsString(), "iptablesTime", runner.Elapsed(), "duration", time.Since(start))
	return passThrough()
}

// rollback removes the rules of specs; it runs inside the pod netns.
func rollback(ctx context.Context, runner *xtables.Runner, specs []redirect.Spec) error {
	var errs []error
	for _, s := range specs {
		if _, err := redirect.Remove(ctx, runner, s, true); err != nil {
			errs = append(errs, fmt.Errorf("roll back %s rules: %w", s.Family, err))
		}
	}
	return errors.Join(errs...)
}

// Del releases the attachment on the node: it removes the state record, which is all
// of the host-side state ADD leaves (the proxy derives attribution and the exposed
// pods' anti-spoofing rules from the records, so those go with it). It never enters
// the pod netns: the rules there go away with the netns, so a process still alive in
// it when DEL comes (a runtime that tears networking down before the last process
// exits, a retried DEL, a CNI reconfiguration) stays concealed, and DEL pays for no
// iptables process or nf_tables commit. A missing record, a netns that is gone and an
// empty CNI_NETNS are not errors; an ADD on a netns that still holds the rules
// reconciles them (redirect.Apply falls back from -N to a snapshot).
func (p *Plugin) Del(args *skel.CmdArgs) error {
	start := time.Now()
	conf, err := netconf.Parse(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "DEL", args)
	defer closeLog()
	rec, readErr := state.Read(conf.StateDir, args.ContainerID, args.IfName)
	if err := state.Remove(conf.StateDir, args.ContainerID, args.IfName); err != nil {
		log.Error("DEL failed removing state record", "err", err)
		return types.NewError(types.ErrIOFailure, "metaconceal: cannot remove state record", err.Error())
	}
	switch {
	case readErr == nil:
		log.Info("record removed; rules left to the netns", "podNamespace", rec.PodNamespace, "podName", rec.PodName,
			"exposed", rec.Exposed, "iptables", "none", "duration", time.Since(start))
	case errors.Is(readErr, state.ErrNotFound):
		log.Info("no state record (already released, or never added); rules, if any, left to the netns",
			"iptables", "none", "duration", time.Since(start))
	default:
		log.Warn("unreadable state record removed; rules left to the netns", "err", readErr,
			"iptables", "none", "duration", time.Since(start))
	}
	return nil
}

// Check verifies that the attachment's rules and record are in place and match.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := netconf.Parse(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "CHECK", args)
	defer closeLog()
	prev, err := parsePrevResult(conf)
	if err != nil {
		return err
	}
	pod := netconf.ParsePodArgs(args.Args)
	fail := func(msg string, err error) error {
		log.Error("CHECK failed", "problem", msg, "err", err)
		return types.NewError(types.ErrInternal, "metaconceal: "+msg, fmt.Sprint(err))
	}
	att := attachment(args)
	ips := podIPs(prev)
	rec, err := state.Read(conf.StateDir, args.ContainerID, args.IfName)
	if err != nil {
		return fail("state record of "+att.String()+" is missing or unreadable", err)
	}
	want := record(conf, args, pod, prev)
	if rec.HostIf == "" {
		// Written by a release that did not record the host interface (the node was
		// upgraded in place): that alone is no drift.
		want.HostIf = ""
	}
	if !rec.Equal(want) {
		return fail("state record of "+att.String()+" differs", fmt.Errorf("want %+v, got %+v", want, rec))
	}
	if want.Exposed {
		log.Info("exposed attachment recorded; no rules to check", "reason", want.ExposedReason)
		return nil
	}
	runner := p.newRunner(conf)
	err = ns.WithNetNSPath(args.Netns, func(ns.NetNS) error {
		var errs []error
		for _, s := range wantedSpecs(conf, att, ips) {
			errs = append(errs, redirect.Check(runner, s))
		}
		return errors.Join(errs...)
	})
	if err != nil {
		return fail("metadata redirect rules of "+att.String()+" are missing or differ", err)
	}
	log.Info("rules and record in place", "iptables", runner.CountsString())
	return nil
}

// exposedReason says why this config leaves the pod unconcealed, or "" when it conceals.
func exposedReason(conf *netconf.Config, pod netconf.PodArgs) string {
	switch {
	case !conf.Mode.Conceals():
		return "mode " + string(conf.Mode)
	case conf.Excluded(pod.Namespace):
		return "excludeNamespaces"
	}
	return ""
}

// GC removes the state records of this network's attachments that are not listed in
// cni.dev/valid-attachments. Like DEL it leaves any rules to their netns: a stale
// attachment's netns that still exists may hold a live process, which stays concealed.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, err := netconf.Parse(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "GC", nil)
	defer closeLog()
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[state.Key(a.ContainerID, a.IfName)] = true
	}
	records, listErr := state.List(conf.StateDir)
	errs := []error{listErr}
	collected := 0
	otherNetworks := 0
	for _, rec := range records {
		if rec.Network != conf.Name {
			otherNetworks++ // another network's attachment: its own GC decides
			continue
		}
		if valid[rec.Key()] {
			continue
		}
		if err := state.Remove(conf.StateDir, rec.ContainerID, rec.IfName); err != nil {
			errs = append(errs, err)
			continue
		}
		collected++
		log.Info("collected stale attachment: record removed; rules left to the netns",
			"containerID", rec.ContainerID, "ifname", rec.IfName, "netns", rec.Netns)
	}
	log.Info("GC done", "records", len(records), "otherNetworks", otherNetworks, "valid", len(valid), "collected", collected)
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrInternal, "metaconceal: GC incomplete", err.Error())
	}
	return nil
}

// Status fails with code 50 when the proxy does not accept TCP connections: pods
// would get "connection refused" from the metadata server, so the runtime should
// report the node not ready.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := netconf.Parse(args.StdinData)
	if err != nil {
		return err
	}
	if !conf.Mode.Conceals() {
		return nil
	}
	targets := []netip.AddrPort{conf.ProxyAddr}
	if conf.Proxy6Addr.IsValid() && len(conf.Metadata6) > 0 {
		targets = append(targets, conf.Proxy6Addr)
	}
	for _, t := range targets {
		conn, err := net.DialTimeout("tcp", t.String(), statusDialTimeout)
		if err != nil {
			log, closeLog := p.logger(conf, "STATUS", nil)
			log.Warn("proxy not ready", "proxy", t.String(), "err", err)
			closeLog()
			return types.NewError(types.ErrPluginNotAvailable,
				fmt.Sprintf("metaconceal: proxy %s does not accept TCP connections", t), err.Error())
		}
		_ = conn.Close() // only the handshake mattered
	}
	return nil
}
