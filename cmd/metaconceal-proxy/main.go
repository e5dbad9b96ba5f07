// Command metaconceal-proxy is the node-local metadata responder: it answers pods'
// metadata requests (redirected to it by the metaconceal CNI plugin), conceals
// kube-env and identity tokens, denies ambiguous requests, and forwards the rest to
// the real metadata server. Subcommands: `metaconceal-proxy doctor` checks a node,
// `metaconceal-proxy remove-host-guard` takes the host guard away (uninstall),
// `metaconceal-proxy probe` is the DaemonSet's exec probe.
//
// The command line only: flags.go turns the flags into one proxyapp.Options, and
// internal/proxyapp validates it, builds the parts (pkg/policy, pkg/proxy,
// pkg/podindex, pkg/altsrelay, pkg/hostguard) and runs them. See docs/design.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
	"github.com/metaconceal/metaconceal/internal/logging"
	"github.com/metaconceal/metaconceal/internal/proxyapp"
	"github.com/metaconceal/metaconceal/pkg/doctor"
)

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
			return runRemoveHostGuard(args[1:], stderr) // remove.go
		case "probe":
			return runProbe(args[1:], stdout, stderr) // probe.go
		}
	}
	return run(args, stderr)
}

// command parses a command's flags with parse and builds its logger; code is the exit
// code to return at once when ok is false (0 for -h, 2 for bad flags).
func command(name string, args []string, stderr io.Writer, parse func([]string, io.Writer) (flagValues, error)) (f flagValues, log *slog.Logger, code int, ok bool) {
	f, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return f, nil, 0, false
	}
	if err == nil {
		log, err = logging.New(stderr, f.logFormat, f.logLevel)
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return f, nil, 2, false
	}
	return f, log, 0, true
}

func run(args []string, stderr io.Writer) int {
	f, log, code, ok := command("metaconceal-proxy", args, stderr, parseFlags)
	if !ok {
		return code
	}
	tuneGC(f, log) // gc.go
	if err := serve(f, log); err != nil {
		log.Error("metaconceal-proxy failed", "err", err)
		return 1
	}
	return 0
}

// newApp turns the flags into the app: every flag is checked before anything changes.
// Its errors name the flag to change.
func newApp(f flagValues, log *slog.Logger) (*proxyapp.App, error) {
	opts, err := f.appOptions(log)
	if err != nil {
		return nil, err
	}
	app, err := proxyapp.New(opts)
	return app, namingFlag(err)
}

func serve(f flagValues, log *slog.Logger) error {
	if f.removeHostGuard {
		log.Warn("--remove-host-guard is deprecated and will be removed in the next release: run `metaconceal-proxy remove-host-guard` with the same flags")
		return removeHostGuard(f, log)
	}
	app, err := newApp(f, log)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return namingFlag(app.Run(ctx))
}
