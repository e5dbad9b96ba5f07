package main

import (
	"github.com/metaconceal/metaconceal/internal/kubeflags"
	"github.com/metaconceal/metaconceal/pkg/podevents"
)

// eventsHelp describes --pod-events of the proxy.
const eventsHelp = "a Warning on the pod behind each concealed (MetadataConcealed) or denied (MetadataDenied) request, rate-limited per pod"

// eventsConfig is the Event recorder's config (nil when --pod-events is off), with an
// API client from --kubeconfig or the in-cluster service account.
func eventsConfig(f *kubeflags.Flags) (*podevents.Config, error) {
	if !f.Events {
		return nil, nil
	}
	client, err := f.Client()
	if err != nil {
		return nil, err
	}
	return &podevents.Config{Client: client, Node: f.NodeName, Burst: f.EventBurst, QPS: f.EventQPS}, nil
}
