// Package policy decides, for one HTTP request to the metadata server, whether a pod
// may see the answer (allow), must not see the endpoint (conceal), or sent a request
// too malformed or ambiguous to judge (deny). It is pure: no I/O, no clock.
//
// The request target is canonicalized first (percent-decoded once, dot segments and
// double slashes resolved, query keys and values reduced to one spelling) and the
// verdict is taken on the canonical form; the proxy sends only that canonical form
// upstream, so what was checked is what the metadata server sees.
//
// Files: policy.go the Policy and Evaluate; path.go the path's canonical form;
// query.go the query's; rules.go the rules a verdict names; filter.go recursive
// listings filtered; file.go the policy file.
package policy

import (
	"fmt"
	"regexp"
	"strings"
)

// RecursiveMode says what happens to recursive listings outside service accounts.
type RecursiveMode uint8

const (
	// RecursiveDeny refuses recursive=... everywhere but under
	// instance/service-accounts/<account>/, as GKE does.
	RecursiveDeny RecursiveMode = iota
	// RecursiveFilter allows recursive listings everywhere under /computeMetadata/v1/
	// and the proxy strips concealed entries from the JSON answer.
	RecursiveFilter
)

// ParseRecursiveMode reads the --recursive flag value.
func ParseRecursiveMode(s string) (RecursiveMode, error) {
	switch s {
	case "deny":
		return RecursiveDeny, nil
	case "filter":
		return RecursiveFilter, nil
	}
	return 0, fmt.Errorf("policy: recursive mode %q: want deny or filter", s)
}

func (m RecursiveMode) String() string {
	if m == RecursiveFilter {
		return "filter"
	}
	return "deny"
}

// Config is everything the policy depends on.
type Config struct {
	Recursive RecursiveMode
	File      File
}

// Policy evaluates requests. It is immutable and safe for concurrent use.
type Policy struct {
	recursive RecursiveMode
	// exposed: the policy for pods the plugin left unconcealed on purpose (see
	// Exposed): nothing concealed, recursive allowed under v1, nothing filtered. The
	// request is still canonicalized and malformed requests are still denied.
	exposed bool
	// concealed are patterns (lowercase segments under /computeMetadata/v1/, "*" for any
	// one segment) whose path and descendants are concealed.
	concealed []pattern
	// listed are the concealed patterns whose values appear in recursive listings;
	// identity tokens are minted on request and never listed.
	listed []pattern
	// namedRes find a concealed pattern's path in a string (FilterListing).
	namedRes []*regexp.Regexp
	// extra are the policy file's query keys, each with its paths and value pattern.
	extra []extraKey
}

type pattern struct {
	segs []string
	rule Rule
}

// builtin concealed patterns. kube-env is also concealed as any segment of any path
// (see concealedRule); the patterns here say where its value is listed.
var builtinPatterns = []pattern{
	{segs: []string{"instance", "attributes", "kube-env"}, rule: RuleKubeEnv},
	{segs: []string{"project", "attributes", "kube-env"}, rule: RuleKubeEnv},
	{segs: []string{"instance", "service-accounts", "*", "identity"}, rule: RuleIdentity},
}

// New validates cfg and builds a Policy.
func New(cfg Config) (*Policy, error) {
	p := &Policy{recursive: cfg.Recursive}
	for _, b := range builtinPatterns {
		p.concealed = append(p.concealed, b)
		if b.rule != RuleIdentity {
			p.listed = append(p.listed, b)
		}
	}
	file, err := compileFile(cfg.File)
	if err != nil {
		return nil, fmt.Errorf("policy file: %w", err)
	}
	p.concealed = append(p.concealed, file.conceal...)
	p.listed = append(p.listed, file.conceal...)
	p.extra = file.keys
	p.namedRes = namedRegexps(p.concealed)
	return p, nil
}

// Effective describes the patterns in effect, one line each, for the start-up log:
// what is concealed, which query keys are allowed where and with which values.
func (p *Policy) Effective() []string {
	out := []string{
		"recursive=" + p.recursive.String(),
		"conceal kube-env: any path segment kube-env under /computeMetadata/v1/, any spelling",
	}
	for _, pat := range p.concealed {
		out = append(out, "conceal "+strings.Join(pat.segs, "/")+" and below ("+pat.rule.String()+")")
	}
	out = append(out,
		"query alt=json|text, wait_for_change=true|false, timeout_sec=0..3600, last_etag=<hex, up to 64> under /computeMetadata/v1/",
		"query recursive=true|false under instance/service-accounts/<account>/ (everywhere under v1 with --recursive=filter)",
		"query scopes="+ScopePrefix+"<scope>[,...] on instance/service-accounts/<account>/token",
		"query audience, format=standard|full, licenses=TRUE|FALSE on instance/service-accounts/<account>/identity (exposed pods only)",
	)
	for _, k := range p.extra {
		paths := make([]string, len(k.paths))
		for i, segs := range k.paths {
			paths[i] = strings.Join(segs, "/")
		}
		out = append(out, fmt.Sprintf("query %s matching ^(?:%s)$ on %s (policy file)", k.key, k.src, strings.Join(paths, ", ")))
	}
	return out
}

// Exposed returns the policy for pods whose state record marks them exposed (mode
// EXPOSED, excluded namespaces): they would reach the metadata server directly but for
// the node-wide host guard, so they are served in full. Canonicalization and every
// deny rule for malformed or ambiguous requests still apply.
func (p *Policy) Exposed() *Policy {
	q := *p
	q.exposed = true
	return &q
}

// Decision is the outcome of Evaluate.
type Decision struct {
	Verdict Verdict
	Rule    Rule
	// Path is the canonical path (always set when allowed; set when the path could be
	// canonicalized otherwise, for the audit log). It starts with '/'.
	Path string
	// RawQuery is the canonical query, without '?'; empty when there is none.
	RawQuery string
	// Recursive is true when the canonical query asks recursive=true.
	Recursive bool
	// FilterListing is true when the answer is a recursive JSON listing that must pass
	// through FilterListing before it reaches the client.
	FilterListing bool
	// WaitForChange is true for a long poll (wait_for_change=true).
	WaitForChange bool
	// TimeoutSec is the long poll timeout asked for, -1 when absent.
	TimeoutSec int
}

// Reason is the text of a denied answer.
func (d Decision) Reason() string {
	return "Request denied by metaconceal rule " + d.Rule.String() + ": " + d.Rule.Description() + ".\n"
}

func deny(rule Rule) Decision { return Decision{Verdict: Deny, Rule: rule, TimeoutSec: -1} }

// Evaluate decides one request. target is the raw request target exactly as received
// (http.Request.RequestURI); forwardedFor says whether an X-Forwarded-For header came.
func (p *Policy) Evaluate(method, target string, forwardedFor bool) Decision {
	if method != "GET" && method != "HEAD" {
		return deny(RuleMethod)
	}
	if forwardedFor {
		return deny(RuleXForwardedFor)
	}
	if target == "" || target[0] != '/' {
		return deny(RuleRequestTarget)
	}
	rawPath, rawQuery, hasQuery := strings.Cut(target, "?")

	canon, rule := canonicalPath(rawPath)
	if rule != 0 {
		return deny(rule)
	}
	var segBuf [16]string
	segs := splitSegments(canon, segBuf[:0])

	d := Decision{Path: canon, TimeoutSec: -1}
	var rest []string // segments under /computeMetadata/v1/, when there
	d.Rule, rest = apiRoot(segs)
	if d.Rule != RuleDiscovery && d.Rule != RuleV1 {
		d.Verdict = Deny
		return d
	}
	inV1 := d.Rule == RuleV1

	exposedHit := false // something only an exposed pod may have
	if inV1 {
		if r := p.concealedRule(rest); r != 0 {
			if !p.exposed {
				d.Verdict, d.Rule = Conceal, r
				return d
			}
			exposedHit = true
		}
	}

	if hasQuery && rawQuery != "" {
		q, rule := p.parseQuery(rawQuery)
		if rule == 0 {
			rule = p.scopeRule(&q, rest, inV1)
		}
		if rule != 0 {
			d.Verdict, d.Rule = Deny, rule
			return d
		}
		if q.has(keyRecursive) {
			if p.decideRecursive(&d, &q, rest, inV1) {
				exposedHit = true
			}
			if d.Verdict == Deny {
				return d
			}
		}
		d.WaitForChange = q.values[keyWaitForChange] == "true"
		d.TimeoutSec = q.timeoutSec
		d.RawQuery = p.canonical(&q)
	}
	if exposedHit {
		d.Rule = RuleExposedPod
	}
	return d
}

// decideRecursive applies the rules for a query with the recursive key to d: the
// rule that allows it, whether the answer must be filtered, or the rule that denies
// it. It reports whether only an exposed pod may have the listing.
func (p *Policy) decideRecursive(d *Decision, q *query, rest []string, inV1 bool) (exposedHit bool) {
	underAccount := inV1 && len(rest) >= 3 &&
		strings.EqualFold(rest[0], "instance") && strings.EqualFold(rest[1], "service-accounts")
	switch {
	case underAccount:
		d.Rule = RuleServiceAccountRecursive
	case inV1 && p.exposed:
		exposedHit = true
	case inV1 && p.recursive == RecursiveFilter:
		d.Rule = RuleRecursiveFiltered
	default:
		d.Verdict, d.Rule = Deny, RuleRecursive
		return false
	}
	d.Recursive = q.values[keyRecursive] == "true"
	if d.Recursive && !p.exposed {
		switch {
		case q.values[keyAlt] != "text":
			d.FilterListing = true
		case p.holdsListed(rest):
			d.Verdict, d.Rule = Deny, RuleRecursiveAltText
		}
		// A text listing of a directory that holds no listed concealed entry (a
		// service account's: identity tokens are never listed) has nothing to
		// remove, and is not JSON: it passes as it is.
	}
	return exposedHit
}

// apiRoot classifies a canonical path by its root: RuleDiscovery, RuleV1 with the
// segments under /computeMetadata/v1/, or the rule that denies any other API.
func apiRoot(segs []string) (Rule, []string) {
	switch {
	case len(segs) == 0:
		return RuleDiscovery, nil
	case segs[0] == "computeMetadata":
		switch {
		case len(segs) == 1:
			return RuleDiscovery, nil
		case segs[1] == "v1":
			return RuleV1, segs[2:]
		case strings.EqualFold(segs[1], "v1beta1"):
			return RuleLegacyAPI, nil
		}
	case segs[0] == "0.1":
		return RuleLegacyAPI, nil
	}
	return RuleUnknownAPIVersion, nil
}

// concealedRule returns the concealing rule for a path under /computeMetadata/v1/, or 0.
func (p *Policy) concealedRule(rest []string) Rule {
	for _, s := range rest {
		// kube-env is concealed wherever it appears, not only where GCE lists it.
		if strings.EqualFold(s, "kube-env") {
			return RuleKubeEnv
		}
	}
	for _, pat := range p.concealed {
		if len(rest) >= len(pat.segs) && pat.matchPrefix(rest) {
			return pat.rule
		}
	}
	return 0
}

// matchPrefix reports whether the first len(pat.segs) segments of segs match.
func (pat pattern) matchPrefix(segs []string) bool {
	for i, ps := range pat.segs {
		if i >= len(segs) {
			return false
		}
		if ps != "*" && !strings.EqualFold(ps, segs[i]) {
			return false
		}
	}
	return true
}

// matchExact reports whether segs is exactly the pattern (case-insensitive).
func matchExact(pat, segs []string) bool {
	return len(pat) == len(segs) && pattern{segs: pat}.matchPrefix(segs)
}

// holdsListed reports whether the directory dir (under /computeMetadata/v1/) is an
// ancestor of, or is, a concealed entry whose value appears in listings.
func (p *Policy) holdsListed(dir []string) bool {
	for _, pat := range p.listed {
		n := min(len(dir), len(pat.segs))
		if (pattern{segs: pat.segs[:n]}).matchPrefix(dir[:n]) {
			return true
		}
	}
	return false
}
