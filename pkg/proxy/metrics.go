package proxy

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Metrics are the proxy's Prometheus series. Counters for every rule are created up
// front and indexed by rule, so counting a request is one atomic add.
type Metrics struct {
	Registry *prometheus.Registry

	byRule          []prometheus.Counter // indexed by policy.Rule
	blockedByNS     *prometheus.CounterVec
	upstreamLatency *prometheus.HistogramVec
	latencyRequest  prometheus.Observer
	latencyLongPoll prometheus.Observer
	upstreamErrors  *prometheus.CounterVec
	longPollsOpen   prometheus.Gauge
	upstreamPolls   prometheus.Gauge
	coalesced       prometheus.Counter
}

// NewMetrics registers the proxy's series, plus the Go and process collectors, in a
// registry of their own.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{Registry: reg}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_requests_total",
		Help: "Requests by policy verdict (allow, conceal, deny) and the rule that decided.",
	}, []string{"verdict", "rule"})
	for _, r := range policy.Rules() {
		m.byRule = append(m.byRule, requests.WithLabelValues(r.Verdict().String(), r.String()))
	}
	m.blockedByNS = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_blocked_requests_by_namespace_total",
		Help: "Concealed and denied requests by the pod namespace they came from (\"unknown\" when the source IP has no state record).",
	}, []string{"namespace", "verdict"})
	m.upstreamLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "metaconceal_proxy_upstream_duration_seconds",
		Help:    "Time from sending a request upstream to its response headers (kind=request) or its end (kind=long_poll).",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600},
	}, []string{"kind"})
	m.latencyRequest = m.upstreamLatency.WithLabelValues("request")
	m.latencyLongPoll = m.upstreamLatency.WithLabelValues("long_poll")
	m.upstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_upstream_errors_total",
		Help: "Upstream failures answered 502 (unreachable) or 504 (timeout), or withheld (bad_listing).",
	}, []string{"reason"})
	for _, reason := range []string{"unreachable", "timeout", "bad_listing"} {
		m.upstreamErrors.WithLabelValues(reason)
	}
	m.longPollsOpen = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "metaconceal_proxy_long_polls_open",
		Help: "Client long polls (wait_for_change=true) currently held.",
	})
	m.upstreamPolls = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "metaconceal_proxy_upstream_long_polls_open",
		Help: "Upstream long poll requests currently open; identical client polls share one.",
	})
	m.coalesced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "metaconceal_proxy_long_polls_coalesced_total",
		Help: "Client long polls that joined an upstream long poll already open for the same canonical request.",
	})
	reg.MustRegister(requests, m.blockedByNS, m.upstreamLatency, m.upstreamErrors,
		m.longPollsOpen, m.upstreamPolls, m.coalesced,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *Metrics) countRequest(r policy.Rule) { m.byRule[r].Inc() }
