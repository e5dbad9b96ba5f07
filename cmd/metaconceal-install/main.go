// Command metaconceal-install puts the metaconceal CNI plugin on a node: it copies the
// plugin binary into the CNI bin dir and its entry into the node's primary CNI config,
// keeps the entry there while the main CNI rewrites its file, and removes both on
// uninstall. It is what the DaemonSet runs; see docs/install.md. The subcommand
// `metaconceal-install selftest` runs the datapath self-test on one pod (docs/datapath.md);
// `metaconceal-install --version` prints the build.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
	"github.com/metaconceal/metaconceal/internal/cliflag"
	"github.com/metaconceal/metaconceal/internal/logging"
	"github.com/metaconceal/metaconceal/pkg/conflist"
	"github.com/metaconceal/metaconceal/pkg/installer"
	"github.com/metaconceal/metaconceal/pkg/netconf"
	"github.com/metaconceal/metaconceal/pkg/nodegate"
	"github.com/metaconceal/metaconceal/pkg/nodelock"
	"github.com/metaconceal/metaconceal/pkg/selftest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	var code int
	if buildinfo.VersionRequested(os.Args[1:]) {
		fmt.Println(buildinfo.String("metaconceal-install"))
	} else if len(os.Args) > 1 && os.Args[1] == "selftest" {
		code = runSelftest(ctx, os.Args[2:], os.Stdout, os.Stderr) // selftest.go
	} else {
		code = run(ctx, os.Args[1:], os.Stderr)
	}
	stop()
	os.Exit(code)
}

// options are the parsed flags.
type options struct {
	binDir, confDir, plugin      string
	once, uninstall, uninstallOn bool
	mode, proxy, alts            string
	exclude                      cliflag.List
	debounce, resync, waitTime   time.Duration
	logFormat, logLevel          string
	lockFile                     string       // watch mode: one agent per node (pkg/nodelock)
	agent                        agentOptions // node agent (watch mode): agent.go
}

// parseFlags reports its errors on stderr itself.
func parseFlags(args []string, stderr io.Writer) (*options, error) {
	var o options
	fs := flag.NewFlagSet("metaconceal-install", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.binDir, "cni-bin-dir", "/opt/cni/bin", "CNI bin dir the plugin binary is copied into")
	fs.StringVar(&o.confDir, "cni-conf-dir", "/etc/cni/net.d", "CNI conf dir whose primary config gets the entry")
	fs.StringVar(&o.plugin, "plugin-binary", defaultPluginBinary(), "plugin binary to copy (default: metaconceal next to this program)")
	fs.BoolVar(&o.once, "once", false, "install, then exit (instead of watching the conf dir)")
	fs.BoolVar(&o.uninstall, "uninstall", false, "remove the entry from every config in the conf dir and the binary, then exit")
	fs.BoolVar(&o.uninstallOn, "uninstall-on-exit", false, "in watch mode, uninstall on SIGTERM/SIGINT")
	fs.StringVar(&o.mode, "mode", string(netconf.DefaultMode), "plugin mode written into the entry: SECURE, EXPOSED or UNSPECIFIED")
	fs.StringVar(&o.proxy, "proxy", netconf.DefaultProxy, "proxy address written into the entry")
	fs.StringVar(&o.alts, "alts", string(netconf.DefaultALTS), "treatment of metadata port 8080 (the ALTS handshaker) written into the entry: relay (to the proxy's ALTS relay, as GKE) or reject")
	fs.Var(&o.exclude, "exclude-namespaces", "namespaces whose pods the plugin leaves alone; repeatable or comma-separated")
	fs.DurationVar(&o.debounce, "debounce", installer.DefaultDebounce, "watch: quiet time after a conf dir change before checking the config")
	fs.DurationVar(&o.resync, "resync", installer.DefaultResync, "watch: how often to check binary and entry without any change (0 disables)")
	fs.DurationVar(&o.waitTime, "wait-timeout", 0, "--once: give up when no CNI config appears within this time (0 waits forever)")
	o.agent.register(fs)
	fs.StringVar(&o.lockFile, "lock-file", "", "watch mode: take this file's exclusive lock (a host directory, e.g. the state dir) before doing anything, so that of two DaemonSet pods side by side in a rolling update only one keeps the entry, the taint and repair; the other waits and takes over when the first exits. Empty: no lock")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "metaconceal-install: unexpected arguments %q\n", fs.Args())
		return nil, errors.New("unexpected arguments")
	}
	o.agent.proxy = o.proxy // the self-test asks it first
	return &o, nil
}

func run(ctx context.Context, args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return 2 // the flag package or parseFlags said why
	}
	log, err := logging.New(stderr, o.logFormat, o.logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "metaconceal-install: %v\n", err)
		return 2
	}
	if o.once && o.uninstall {
		log.Error("--once and --uninstall exclude each other")
		return 2
	}
	if err := o.agent.validate(!o.once && !o.uninstall); err != nil {
		log.Error("bad node agent flags", "err", err)
		return 2
	}
	entry := entryOf(o)
	if err := validateEntry(entry); err != nil {
		log.Error("refusing to write an entry the plugin would reject", "err", err)
		return 2
	}
	in, err := installer.New(installer.Options{
		BinDir: o.binDir, ConfDir: o.confDir, PluginBinary: o.plugin, Entry: entry,
		Debounce: o.debounce, Resync: o.resync, Log: log,
	})
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}

	switch {
	case o.uninstall:
		err = in.Uninstall()
		// The node agent's last self-test outcome, kept in the state dir for doctor.
		removed, rerr := selftest.RemoveOutcome(o.agent.stateDir)
		if removed {
			log.Info("removed the self-test outcome", "dir", o.agent.stateDir, "file", selftest.OutcomeFile)
		}
		err = errors.Join(err, rerr)
		// The node agent's lock file (--lock-file, named in the state dir by default).
		lockPath := o.lockFile
		if lockPath == "" {
			lockPath = filepath.Join(o.agent.stateDir, nodelock.FileName)
		}
		removed, rerr = nodelock.Remove(lockPath)
		if removed {
			log.Info("removed the node agent lock file", "file", lockPath)
		}
		err = errors.Join(err, rerr)
		if removed, merr := nodegate.RemoveMarker(o.agent.stateDir); removed {
			log.Info("removed the readiness gate's marker", "dir", o.agent.stateDir, "file", nodegate.OpenedMarker)
		} else {
			err = errors.Join(err, merr)
		}
	case o.once:
		if o.waitTime > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, o.waitTime)
			defer cancel()
		}
		err = in.Once(ctx)
	default:
		var lock *nodelock.Lock
		if o.lockFile != "" {
			if lock, err = nodelock.Acquire(ctx, o.lockFile, lockHolder(), log); err != nil {
				if ctx.Err() != nil {
					log.Info("stopped while waiting for the node agent lock")
					return 0
				}
				break
			}
			defer lock.Release()
		}
		log.Info("watching", "dir", o.confDir, "uninstall_on_exit", o.uninstallOn, "lock", o.lockFile)
		err = o.agent.runBeside(ctx, o.confDir, log, func(ctx context.Context) error { return in.Run(ctx, o.uninstallOn) })
	}
	if err != nil {
		log.Error("failed", "err", err)
		return 1
	}
	return 0
}

// lockHolder names this agent in the lock file: its pod (POD_NAME, set by the
// DaemonSet) or its host.
func lockHolder() string {
	if p := os.Getenv("POD_NAME"); p != "" {
		return "pod=" + p
	}
	h, _ := os.Hostname()
	return "host=" + h
}

func entryOf(o *options) conflist.Entry {
	return conflist.Entry{Mode: o.mode, Proxy: o.proxy, ALTS: o.alts, ExcludeNamespaces: o.exclude}
}

// validateEntry runs the entry through the plugin's own config parser.
func validateEntry(e conflist.Entry) error {
	raw, err := e.Marshal("", "")
	if err != nil {
		return err
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return err
	}
	m["cniVersion"], m["name"] = "1.0.0", "validate"
	conf, err := json.Marshal(m)
	if err != nil {
		return err
	}
	_, err = netconf.Parse(conf)
	return err
}

func defaultPluginBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return "/metaconceal/" + conflist.PluginType
	}
	return filepath.Join(filepath.Dir(exe), conflist.PluginType)
}
