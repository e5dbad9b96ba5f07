package proxy

import (
	"bytes"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// decide: the policy decides; an exposed pod is served in full what the policy
// restricts, unless it is malformed, and each such request is logged.
func TestDecide(t *testing.T) {
	t.Parallel()
	const kubeEnv = "/computeMetadata/v1/instance/attributes/kube-env"
	for _, tc := range []struct {
		name       string
		exposed    bool
		target     string
		wantRule   policy.Rule
		wantLogged bool
	}{
		{"allowed", false, "/computeMetadata/v1/project/project-id", policy.RuleV1, false},
		{"concealed", false, kubeEnv, policy.RuleKubeEnv, false},
		{"concealed, exposed pod", true, kubeEnv, policy.RuleExposedPod, true},
		{"allowed, exposed pod: not decided again", true, "/computeMetadata/v1/project/project-id", policy.RuleV1, false},
		{"malformed, exposed pod: still denied", true, "/computeMetadata/v1/a\\b", policy.RuleBadCharacter, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pol, err := policy.New(policy.Config{})
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			m := NewMetrics()
			cs := testClients(Limits{})
			d := newDecider(pol, m, &auditor{clients: cs, metrics: m, log: slog.New(slog.NewJSONHandler(&logs, nil))})
			src := podSource("ns", "pod", "10.0.0.1")
			src.exposed = tc.exposed // the exposed listener accepted it
			r := httptest.NewRequest("GET", "/", nil)
			r.RequestURI = tc.target
			x := exchange{w: httptest.NewRecorder(), r: r, cl: cs.acquire(src), src: src}
			d.decide(&x)
			if x.d.Rule != tc.wantRule {
				t.Errorf("rule %s; want %s", x.d.Rule, tc.wantRule)
			}
			if logged := strings.Contains(logs.String(), "served to an exposed pod"); logged != tc.wantLogged {
				t.Errorf("logged %v; want %v: %s", logged, tc.wantLogged, logs.String())
			}
		})
	}
}
