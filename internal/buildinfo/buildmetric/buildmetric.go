// Package buildmetric exports a build's identity (package buildinfo) as the
// metaconceal_build_info gauge. It lives apart from buildinfo so that the CNI plugin,
// which prints its version but exports no metrics, does not link the Prometheus
// client: its package initialisers cost the plugin about 3 ms of every ADD (`GODEBUG=inittrace=1`).
package buildmetric

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/internal/buildinfo"
)

// Name is the build info gauge's name: value 1, labels version, commit and goversion.
const Name = "metaconceal_build_info"

// For returns the metaconceal_build_info gauge of build i, for the caller to register
// on its own registry.
func For(i buildinfo.Info) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        Name,
		Help:        "Always 1; its labels name the build: version, commit and the Go version it was built with.",
		ConstLabels: prometheus.Labels{"version": i.Version, "commit": i.Commit, "goversion": i.GoVersion},
	})
	g.Set(1)
	return g
}

// New returns this program's metaconceal_build_info gauge.
func New() prometheus.Collector { return For(buildinfo.Get()) }
