package proxy

import (
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// bodyDecision is the decision for a request that announces a body (admission).
var bodyDecision = policy.Decision{Verdict: policy.Deny, Rule: policy.RuleRequestBody, TimeoutSec: -1}

// decider is the decision stage: the policy decides each request; a request it
// restricts (not allowed, or a listing to filter) from an exposed pod (mode EXPOSED,
// excluded namespace) is decided again by the exposed policy, which serves it in
// full unless it is malformed.
type decider struct {
	policy  *policy.Policy
	exposed *policy.Policy // for pods the plugin left unconcealed
	metrics *Metrics
	audit   *auditor
}

func newDecider(p *policy.Policy, m *Metrics, a *auditor) decider {
	return decider{policy: p, exposed: p.Exposed(), metrics: m, audit: a}
}

// decide sets x.d and counts it.
func (s *decider) decide(x *exchange) {
	_, forwardedFor := x.r.Header["X-Forwarded-For"]
	x.d = s.policy.Evaluate(x.r.Method, x.r.RequestURI, forwardedFor)
	if (x.d.Verdict != policy.Allow || x.d.FilterListing) && x.src.exposed {
		// Only requests the policy restricts need to know whether the connection came
		// from an exposed pod (the guard's rules at its SYN): then it is served in full.
		if e := s.exposed.Evaluate(x.r.Method, x.r.RequestURI, forwardedFor); e.Verdict == policy.Allow {
			x.d = e
			s.audit.exposedServed(x)
		}
	}
	s.metrics.countRequest(x.d.Rule)
}
