package proxy

import (
	"net/http"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// exchange is one request on its way through the stages (see the package doc): the
// writer to answer on, what identity and admission learned, and what the decision
// said. Each stage reads what the stages before it set and adds its own part.
type exchange struct {
	w http.ResponseWriter
	r *http.Request

	// Set by identify (identity.go).
	conn *connInfo // nil when served without NewServer's hooks
	cl   *client   // the pod's (or source IP's) budgets
	src  source    // this connection's source, for the audit log

	// Set by decide (decision.go); the admission stage sets it for a refused body.
	d policy.Decision
}

// head reports whether the request is a HEAD (the answer has no body).
func (x *exchange) head() bool { return x.r.Method == http.MethodHead }

// gone reports whether the client went away (its context ended).
func (x *exchange) gone() bool { return x.r.Context().Err() != nil }
