// Package proxy is the HTTP side of metaconceal-proxy: it asks pkg/policy about each
// request, answers concealed and denied requests itself (and audits them), and sends
// allowed ones upstream in their canonical form only.
//
// One request crosses each stage once, in this order, carried by one per-request
// value (exchange, exchange.go):
//
//	identify   identity.go   who is asking: the pod behind the connection (source, podKey),
//	                         once per connection (Listener, ConnContext)
//	admit      admission.go  request body, the pod's connection cap and request rate
//	                         (golang.org/x/time/rate); fair shares of the node-wide caps:
//	                         faircap.go
//	decide     decision.go   the policy, and the re-decision for an exposed pod
//	answer     answer.go     long poll (longpoll.go) | filtered listing (listing.go) |
//	                         cache (cache.go, cachetable.go, token.go, cachestats.go)
//	                         -> flight (coalesce.go, internal/flight) -> upstream
//	                         (upstream.go: the upstream interface; pool.go, the
//	                         keep-alive pool behind it); reqKey (key.go) names
//	                         identical requests
//	respond    respond.go    every answer the proxy makes itself: concealed, denied,
//	                         429, 503, 502/504, withheld listings
//	audit      audit.go      the one audit point: log lines within each pod's audit
//	                         rate, metrics by namespace, Events
//
// handler.go builds the stages (New) and runs them (ServeHTTP), and holds the
// lifecycle (Drain, Close); server.go has the http.Server settings, admin endpoints and
// listeners; metrics.go the Prometheus series; selftest.go the node agent's probe.
package proxy
