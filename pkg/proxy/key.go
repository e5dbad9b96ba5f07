package proxy

import (
	"context"
	"net/http"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

// reqKey identifies identical requests: everything that is sent upstream or that
// changes what the client gets back. It keys the cache and the coalescing of GETs
// and long polls (flights). The path and query are canonical, so spellings that
// mean the same share a key; requests whose answers are treated differently
// (filtered, or served in full to an exposed pod) never do. The client's Host plays
// no part: ServeHTTP replaces it with the upstream's.
type reqKey struct {
	path, query, host string
	flavor            string // the Metadata-Flavor values, joined by "\x00"
	flags             uint8
}

const (
	keyFlavor   uint8 = 1 << iota // a Metadata-Flavor header was forwarded
	keyFiltered                   // the answer is a filtered recursive listing
	keyExposed                    // served in full to an exposed pod
	keyHead                       // HEAD (long polls): the answer has headers only
)

func (a *answerer) requestKey(x *exchange) reqKey {
	k := reqKey{path: x.d.Path, query: x.d.RawQuery, host: x.r.Host}
	if k.host == "" {
		k.host = a.upstreamHost
	}
	if v := forwardedFlavor(x.r); v != nil {
		k.flags |= keyFlavor
		if len(v) == 1 {
			k.flavor = v[0]
		} else {
			k.flavor = strings.Join(v, "\x00")
		}
	}
	if x.d.FilterListing {
		k.flags |= keyFiltered
	}
	if x.d.Rule == policy.RuleExposedPod {
		k.flags |= keyExposed
	}
	if x.head() {
		k.flags |= keyHead
	}
	return k
}

// head reports whether the key stands for a HEAD.
func (k reqKey) head() bool { return k.flags&keyHead != 0 }

// current is the key of the request that asks for the value a long poll waits on,
// without waiting: its query without wait_for_change, timeout_sec and last_etag
// (what GCE answers when a poll's timeout_sec elapses).
func (k reqKey) current() reqKey {
	var kept []string
	for _, kv := range strings.Split(k.query, "&") {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "wait_for_change", "timeout_sec", "last_etag", "":
			continue
		}
		kept = append(kept, kv)
	}
	k.query = strings.Join(kept, "&")
	return k
}

// upstreamRequest is the GET a key stands for, on the lean pool.
func (k reqKey) upstreamRequest() upstreamRequest {
	return upstreamRequest{method: http.MethodGet, host: k.host, path: k.path, rawQuery: k.query, flavor: k.flavorValues()}
}

func (k reqKey) flavorValues() []string {
	if k.flags&keyFlavor == 0 {
		return nil
	}
	return strings.Split(k.flavor, "\x00")
}

// newUpstreamRequest builds the request the upstream sees for a long poll: the
// canonical path and query, the upstream's Host, and of the client's headers only
// Metadata-Flavor (all from key). The upstream enforces the header, so a client that
// did not send it gets the upstream's own 403, exactly as without the proxy;
// X-Forwarded-For and everything else never leave the node. A HEAD whose answer is
// filtered is sent as GET: it too is answered from a checked listing.
func (a *answerer) newUpstreamRequest(ctx context.Context, key reqKey) *http.Request {
	method := http.MethodGet
	if key.head() && key.flags&keyFiltered == 0 {
		method = http.MethodHead
	}
	out, _ := http.NewRequestWithContext(ctx, method, "", nil) // "" cannot fail to parse
	out.URL.Scheme = a.upstreamScheme
	out.URL.Host = a.upstreamHost
	out.URL.Path = key.path
	out.URL.RawQuery = key.query
	out.Host = key.host
	if v := key.flavorValues(); v != nil {
		out.Header["Metadata-Flavor"] = v
	}
	return out
}

// forwardedFlavor is the client's Metadata-Flavor header, the one header forwarded.
// Values that could split the upstream request are dropped (the upstream then
// refuses the request for lack of the header).
func forwardedFlavor(r *http.Request) []string {
	v := r.Header["Metadata-Flavor"]
	for _, s := range v {
		if !validHeaderValue(s) {
			return nil
		}
	}
	return v
}
