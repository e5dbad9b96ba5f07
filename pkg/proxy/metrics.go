package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Metrics are the proxy's Prometheus series. Counters for every rule are created up
// front and indexed by rule, so counting a request is one atomic add.
type Metrics struct {
	Registry *prometheus.Registry

	byRule          []prometheus.Counter // indexed by policy.Rule
	blockedByNS     *prometheus.CounterVec
	unattributed    prometheus.Counter
	upstreamLatency *prometheus.HistogramVec
	latencyRequest  prometheus.Observer
	latencyLongPoll prometheus.Observer
	upstreamErrors  *prometheus.CounterVec
	longPollsOpen   prometheus.Gauge
	upstreamPolls   prometheus.Gauge
	coalesced       prometheus.Counter
	refused         *prometheus.CounterVec
	auditDropped    *prometheus.CounterVec
	clientConns     prometheus.Gauge
}

// NewMetrics registers the proxy's series in a registry of their own. Process-wide
// collectors (Go runtime, process) are the binary's to add (internal/proxyapp does).
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
		Help: "Concealed and denied requests by the pod namespace they came from (\"unattributed\" when the kernel did not attest the connection's pod, \"unknown\" when its record names no namespace).",
	}, []string{"namespace", "verdict"})
	m.unattributed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "metaconceal_proxy_unattributed_requests_total",
		Help: "Requests on connections the host guard did not attest to a recorded pod (served as concealed, in one shared budget).",
	})
	m.upstreamLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "metaconceal_proxy_upstream_duration_seconds",
		Help:    "Time from sending a request upstream to its response headers (kind=request) or its end (kind=long_poll).",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600},
	}, []string{"kind"})
	m.latencyRequest = m.upstreamLatency.WithLabelValues("request")
	m.latencyLongPoll = m.upstreamLatency.WithLabelValues("long_poll")
	m.upstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_upstream_errors_total",
		Help: "Upstream failures answered 502 (unreachable), 504 (timeout) or 503 (busy: no upstream slot under --max-upstream-conns before the deadline), or withheld (bad_listing: a listing to filter that was not a 200 in GCE's JSON shape).",
	}, []string{"reason"})
	for _, reason := range []string{"unreachable", "timeout", "bad_listing", "busy"} {
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
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_refused_requests_total",
		Help: "Requests refused by a limit, by the pod namespace they came from (\"unknown\" without a state record) and reason: pod_rate, pod_conns, pod_long_polls (429), upstream_long_polls (503).",
	}, []string{"namespace", "reason"})
	m.auditDropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_audit_lines_dropped_total",
		Help: "Audit log lines not written because the pod exceeded its audit rate, by pod namespace; the log summarises them.",
	}, []string{"namespace"})
	m.clientConns = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "metaconceal_proxy_client_connections_open",
		Help: "Client connections open now, held long polls included.",
	})
	reg.MustRegister(m.refused, m.auditDropped, m.clientConns, m.unattributed)
	reg.MustRegister(requests, m.blockedByNS, m.upstreamLatency, m.upstreamErrors,
		m.longPollsOpen, m.upstreamPolls, m.coalesced)
	return m
}

func (m *Metrics) countRequest(r policy.Rule) { m.byRule[r].Inc() }
