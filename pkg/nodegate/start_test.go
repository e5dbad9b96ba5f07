package nodegate

import (
	"context"
	"errors"
	"log/slog"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// The first step after a boot: with CloseAtStart, a node that is not protected yet is
// tainted (a rebooted node keeps its Node object, so the kubelet does not taint it);
// without it, the gate only learns; a protected node is never tainted.
func TestCloseAtStart(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		closeAtStart bool
		failing      bool
		wantTaint    bool
		wantOpen     bool
	}{
		{"after boot, not protected yet: tainted", true, true, true, false},
		{"after boot, already protected: untouched", true, false, false, true},
		{"agent restarted, not protected: only learns", false, true, false, true},
		{"agent restarted, protected: untouched", false, false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "1"}})
			probe := func(context.Context) error { return nil }
			if tc.failing {
				probe = func(context.Context) error { return errors.New("proxy not ready") }
			}
			g, err := New(Config{Client: client, Node: "n1", CloseAtStart: tc.closeAtStart,
				Checks: []Check{{Name: "proxy-ready", Probe: probe}}, Log: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Step(context.Background()); err != nil {
				t.Fatal(err)
			}
			node, err := client.CoreV1().Nodes().Get(context.Background(), "n1", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := HasTaint(node.Spec.Taints); got != tc.wantTaint {
				t.Errorf("tainted %v; want %v", got, tc.wantTaint)
			}
			if g.Open() != tc.wantOpen {
				t.Errorf("Open %v; want %v", g.Open(), tc.wantOpen)
			}
		})
	}
}
