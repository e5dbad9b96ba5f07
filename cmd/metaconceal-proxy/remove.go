package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"syscall"

	"github.com/metaconceal/metaconceal/pkg/hostguard"
)

// runRemoveHostGuard is `metaconceal-proxy remove-host-guard`.
func runRemoveHostGuard(args []string, stderr io.Writer) int {
	f, log, code, ok := command("metaconceal-proxy remove-host-guard", args, stderr, parseRemoveFlags)
	if !ok {
		return code
	}
	if err := removeHostGuard(f, log); err != nil {
		log.Error("metaconceal-proxy remove-host-guard failed", "err", err)
		return 1
	}
	return 0
}

// removeHostGuard takes away the guard that the proxy, run with the same flags, left.
func removeHostGuard(f flagValues, log *slog.Logger) error {
	upstream, err := parseUpstream(f.upstream)
	if err != nil {
		return err
	}
	gcfg, err := guardConfig(f, upstream)
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
