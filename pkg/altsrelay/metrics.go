package altsrelay

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	connections     *prometheus.CounterVec
	open            prometheus.Gauge
	bytesToUpstream prometheus.Counter
	bytesToPod      prometheus.Counter
	upstreamErrors  prometheus.Counter
	refused         *prometheus.CounterVec
	idleClosed      prometheus.Counter
	auditDropped    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metaconceal_proxy_alts_bytes_total",
		Help: "Bytes relayed by the ALTS relay, by direction (to_upstream, to_pod).",
	}, []string{"direction"})
	m := &metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metaconceal_proxy_alts_connections_total",
			Help: "Connections accepted by the ALTS relay, by the pod namespace they came from (\"unknown\" when the source IP has no state record).",
		}, []string{"namespace"}),
		open: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "metaconceal_proxy_alts_connections_open",
			Help: "Connections the ALTS relay holds open now.",
		}),
		bytesToUpstream: bytes.WithLabelValues("to_upstream"),
		bytesToPod:      bytes.WithLabelValues("to_pod"),
		upstreamErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metaconceal_proxy_alts_upstream_errors_total",
			Help: "ALTS connections closed because the upstream (metadata server port 8080) could not be reached.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metaconceal_proxy_alts_refused_total",
			Help: "ALTS relay connections refused, by reason: a cap (node_limit, pod_limit, shutting_down); the filter, which passes only gRPC calls to the ALTS handshaker service over HTTP/2 with prior knowledge (tls, http1, not_h2, no_request, h2_frame, path, not_grpc); or no first request within the handshake timeout (handshake_timeout).",
		}, []string{"reason"}),
		idleClosed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metaconceal_proxy_alts_idle_closed_total",
			Help: "ALTS relay connections closed because no byte moved either way for the idle timeout.",
		}),
		auditDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metaconceal_proxy_alts_audit_lines_dropped_total",
			Help: "Audit lines of refused ALTS relay connections not written because their source exceeded its audit rate; the log summarises them.",
		}),
	}
	for _, reason := range append([]string{"node_limit", "pod_limit", "shutting_down"}, filterReasons...) {
		m.refused.WithLabelValues(reason)
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.connections, m.open, bytes, m.upstreamErrors, m.refused, m.idleClosed, m.auditDropped} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("altsrelay: registering metrics: %w", err)
		}
	}
	return m, nil
}
