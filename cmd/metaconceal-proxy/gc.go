package main

import (
	"log/slog"
	"os"
	"runtime/debug"
)

// The proxy's live heap is a few MiB, most of it static (type registrations of the
// Kubernetes client used for pod Events). With Go's default GOGC=100 the collector
// then runs every few MiB of allocation and marks that same static heap each time:
// about a tenth of the proxy's CPU at full load. A higher target makes collections
// rarer; the soft memory limit keeps the heap under the container's limit when many
// connections or long polls are held (conf/deploy/daemonset.yaml: 384 MiB).
const (
	defaultGCPercent        = 400
	defaultGCMemoryLimitMiB = 256
)

// tuneGC applies --gc-percent and --gc-memory-limit-mib. GOGC and GOMEMLIMIT in the
// environment, when set, take precedence.
func tuneGC(o flagValues, log *slog.Logger) {
	gogc := os.Getenv("GOGC")
	if gogc == "" {
		debug.SetGCPercent(o.gcPercent)
	}
	if os.Getenv("GOMEMLIMIT") == "" && o.gcLimitMiB > 0 {
		debug.SetMemoryLimit(int64(o.gcLimitMiB) << 20)
	}
	// SetMemoryLimit with a negative value only reads the limit.
	log.Debug("garbage collector", "gc_percent_flag", o.gcPercent, "GOGC", gogc, "memory_limit_bytes", debug.SetMemoryLimit(-1))
}
