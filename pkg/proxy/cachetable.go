package proxy

import (
	"strings"
	"time"
)

// The cache table: what the proxy keeps, for how long, and why GCE allows it. It is
// the one place that decides; docs/proxy.md mirrors it. A request is cacheable only
// when all of these hold, and everything else is at most coalesced:
//
//   - the policy allowed it as an ordinary /computeMetadata/v1/ request (rule v1: not
//     an exposed pod's concealed path, not a filtered listing, not a long poll), so
//     concealed and denied requests never come near the cache;
//   - the method is GET;
//   - its canonical path matches a row below segment by segment (lowercase, exactly:
//     another spelling is simply not cached);
//   - its canonical query holds no key but the row's (alt for every row, scopes for
//     tokens); each distinct canonical query is an entry of its own, so alt=text,
//     alt=json, no alt and every scopes value never share an answer;
//   - the upstream answered 200 (errors, redirects and refusals are never kept) and,
//     for tokens, the answer parses with a positive expires_in.
//
// Entries are also keyed by the client's Host and Metadata-Flavor header values, as
// sent upstream: an answer is only ever served to a request the upstream would have
// seen identically (a client without Metadata-Flavor: Google still gets the upstream's
// own 403).

// cacheKind says how long an entry lives.
type cacheKind uint8

const (
	notCached  cacheKind = iota
	cacheFact            // fixed for the life of the VM: a short TTL
	cacheToken           // an OAuth2 access token: until its safety margin
)

func (k cacheKind) String() string {
	switch k {
	case cacheFact:
		return "fact"
	case cacheToken:
		return "token"
	}
	return "none"
}

// cacheRow is one row of the cache table.
type cacheRow struct {
	// Path under /computeMetadata/v1/, segments separated by '/'; "*" matches any one
	// segment (a service account: "default" or its email).
	Path string
	Kind cacheKind
	// Lifetime, in words, for the docs.
	Lifetime string
	// Reason is GCE's: why a cached answer is the answer the upstream would give.
	Reason string

	segs []string
}

// CacheTable is the cache table. Everything not in it is never cached.
var CacheTable = []cacheRow{
	{Path: "instance/service-accounts/*/token", Kind: cacheToken,
		Lifetime: "until less than the safety margin max(5 min, 20% of the answer's expires_in) remains; refreshed once in the background from max(1 min, 5% of it) before that",
		Reason:   "GCE mints an access token with a fixed lifetime (expires_in, about 1 h) and its own metadata server hands the same token out until shortly before expiry; expires_in in each cached answer is recomputed from the remaining lifetime"},
	{Path: "project/project-id", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "chosen when the project is created, never changes"},
	{Path: "project/numeric-project-id", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "assigned when the project is created, never changes"},
	{Path: "instance/id", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "assigned when the VM is created, fixed for its life"},
	{Path: "instance/zone", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "a VM never changes zone (moving one recreates it)"},
	{Path: "instance/name", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "fixed when the VM is created"},
	{Path: "instance/hostname", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "derived from the name, zone and project, or a custom hostname set at creation"},
	{Path: "instance/machine-type", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "changes only while the VM is stopped, which restarts the node and this proxy"},
	{Path: "instance/service-accounts/*/email", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "the VM's service account changes only while the VM is stopped"},
	{Path: "instance/service-accounts/*/aliases", Kind: cacheFact, Lifetime: "--cache-ttl",
		Reason: "the VM's service account changes only while the VM is stopped"},
}

// NotCachedReason is the table's last row, for the docs: everything else.
const NotCachedReason = "attributes, tags, maintenance events, network interfaces, scopes, listings and long polls can change at any time (or wait for a change): " +
	"never cached; identical concurrent GETs still share one upstream request"

// Token timing. The margin is the safety margin: a cached token is never served with
// less than that left. The lead is how much earlier one background refresh starts,
// so that it is done before the margin; refreshRetry spaces refreshes that failed or
// that brought a token not yet due for renewal upstream.
const (
	tokenMarginMin  = 5 * time.Minute
	tokenMarginPart = 5 // 1/5: 20% of the lifetime
	tokenLeadMin    = time.Minute
	tokenLeadPart   = 20 // 1/20: 5% of the lifetime
	refreshRetry    = 10 * time.Second
	// maxTokenLifetime bounds an expires_in taken at its word; a larger one is
	// passed on but not cached.
	maxTokenLifetime = 24 * time.Hour
)

// DefaultFactTTL is how long a VM-lifetime fact is served from the cache; MaxFactTTL
// bounds --cache-ttl, which is meant to stay short.
const (
	DefaultFactTTL = 10 * time.Second
	MaxFactTTL     = 10 * time.Minute
)

// tokenMargin is the safety margin for a token whose answer said lifetime.
func tokenMargin(lifetime time.Duration) time.Duration {
	return max(tokenMarginMin, lifetime/tokenMarginPart)
}

// tokenLead is how long before the margin a background refresh starts.
func tokenLead(lifetime time.Duration) time.Duration {
	return max(tokenLeadMin, lifetime/tokenLeadPart)
}

const v1Prefix = "/computeMetadata/v1/"

// exactRows maps the full canonical path of every row without a wildcard to its
// kind; wildRows are the others, matched segment by segment. Both come from
// CacheTable.
var (
	exactRows = map[string]cacheKind{}
	wildRows  []cacheRow
)

func init() {
	for i := range CacheTable {
		row := &CacheTable[i]
		row.segs = strings.Split(row.Path, "/")
		if strings.Contains(row.Path, "*") {
			wildRows = append(wildRows, *row)
		} else {
			exactRows[v1Prefix+row.Path] = row.Kind
		}
	}
}

// lookupRow returns the kind of a canonical path, notCached when no row matches.
func lookupRow(path string) cacheKind {
	if kind, ok := exactRows[path]; ok {
		return kind
	}
	rest, ok := strings.CutPrefix(path, v1Prefix)
	if !ok || rest == "" {
		return notCached
	}
	for i := range wildRows {
		if matchSegs(wildRows[i].segs, rest) {
			return wildRows[i].Kind
		}
	}
	return notCached
}

// matchSegs matches rest ("a/b/c") against segs without allocating.
func matchSegs(segs []string, rest string) bool {
	for i, seg := range segs {
		var cur string
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			if i == len(segs)-1 {
				return false // more segments (or a trailing slash) than the row
			}
			cur, rest = rest[:j], rest[j+1:]
		} else {
			if i != len(segs)-1 {
				return false
			}
			cur, rest = rest, ""
		}
		if cur == "" || (seg != "*" && cur != seg) {
			return false
		}
	}
	return rest == ""
}

// cacheableQuery reports whether a canonical query holds only the keys a row of
// kind allows: alt, and for tokens scopes.
func cacheableQuery(kind cacheKind, rawQuery string) bool {
	for rawQuery != "" {
		var part string
		part, rawQuery, _ = strings.Cut(rawQuery, "&")
		key, _, _ := strings.Cut(part, "=")
		switch {
		case key == "alt":
		case key == "scopes" && kind == cacheToken:
		default:
			return false
		}
	}
	return true
}
