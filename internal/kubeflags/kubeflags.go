// Package kubeflags holds the command-line flags shared by the programs that talk to the
// Kubernetes API (the proxy's Events, the node agent's gate, repair and Events): how to
// reach the API server, the node's name, and the Event settings.
package kubeflags

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/metaconceal/metaconceal/pkg/podevents"
)

// NodeNameEnv is read when --node-name is not given (the DaemonSet sets it from
// spec.nodeName through the downward API).
const NodeNameEnv = "NODE_NAME"

// Flags are the API flags of one program.
type Flags struct {
	Kubeconfig string
	NodeName   string
	Events     bool
	EventBurst int
	EventQPS   float64
}

// Register adds the flags to fs; eventsHelp says what the Events are about.
func (f *Flags) Register(fs *flag.FlagSet, eventsHelp string) {
	fs.StringVar(&f.Kubeconfig, "kubeconfig", "", "kubeconfig to reach the API server (default: the pod's in-cluster service account)")
	fs.StringVar(&f.NodeName, "node-name", os.Getenv(NodeNameEnv), "this node's name (default $"+NodeNameEnv+")")
	fs.BoolVar(&f.Events, "pod-events", false, "record Kubernetes Events on pods: "+eventsHelp)
	fs.IntVar(&f.EventBurst, "pod-events-burst", podevents.DefaultBurst, "Events: how many one pod may get at once before the rate limit")
	fs.Float64Var(&f.EventQPS, "pod-events-qps", podevents.DefaultQPS, "Events: how fast one pod's allowance refills, per second (default one per 5 minutes)")
}

// Client returns an API client from --kubeconfig or the in-cluster service account.
func (f *Flags) Client() (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if f.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", f.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("API server configuration (--kubeconfig or in-cluster): %w", err)
	}
	cfg.UserAgent = "metaconceal"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return client, nil
}

// Recorder returns the Event recorder for component, or nil when --pod-events is off.
func (f *Flags) Recorder(client kubernetes.Interface, component string, log *slog.Logger) (*podevents.Recorder, error) {
	if !f.Events {
		return nil, nil
	}
	if client == nil {
		return nil, errors.New("--pod-events needs an API client")
	}
	return podevents.New(podevents.Config{
		Client: client, Component: component, Node: f.NodeName,
		Burst: f.EventBurst, QPS: f.EventQPS, Log: log,
	})
}
