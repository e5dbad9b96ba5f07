package main

import (
	"log/slog"

	"github.com/metaconceal/metaconceal/internal/kubeflags"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// eventsHelp describes --pod-events of the proxy.
const eventsHelp = "a Warning on the pod behind each concealed (MetadataConcealed) or denied (MetadataDenied) request, rate-limited per pod"

// blockNotifier returns the proxy's Event notifier (nil when --pod-events is off) and
// what stops it.
func blockNotifier(f *kubeflags.Flags, log *slog.Logger) (proxy.BlockNotifier, func(), error) {
	if !f.Events {
		return nil, func() {}, nil
	}
	client, err := f.Client()
	if err != nil {
		return nil, nil, err
	}
	rec, err := f.Recorder(client, "metaconceal-proxy", log)
	if err != nil {
		return nil, nil, err
	}
	log.Info("recording Events on pods for concealed and denied requests", "node", f.NodeName, "burst", f.EventBurst, "qps", f.EventQPS)
	return rec, rec.Close, nil
}
