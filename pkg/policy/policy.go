// Package policy decides, for one HTTP request to the metadata server, whether a pod
// may see the answer (allow), must not see the endpoint (conceal), or sent a request
// too malformed or ambiguous to judge (deny). It is pure: no I/O, no clock.
//
// The request target is canonicalized first (percent-decoded once, dot segments and
// double slashes resolved, query keys and values reduced to one spelling) and the
// verdict is taken on the canonical form; the proxy sends only that canonical form
// upstream, so what was checked is what the metadata server sees.
package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"slices"
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

// File is the optional policy file (JSON). Defaults reproduce GKE's concealment.
type File struct {
	// ConcealPaths are extra paths relative to /computeMetadata/v1/ to conceal, with the
	// same strength as kube-env: case-insensitive, the path and everything under it,
	// and removed from recursive listings. "*" matches one segment.
	// Example: "instance/attributes/kube-labels", "instance/service-accounts/*/token".
	ConcealPaths []string `json:"concealPaths,omitempty"`
	// AllowQueryKeys are extra query keys passed upstream (decoded once, re-encoded),
	// for example "scopes" for service-accounts/<account>/token?scopes=...
	AllowQueryKeys []string `json:"allowQueryKeys,omitempty"`
}

// LoadFile reads a policy file. Unknown fields are an error, so that a typo does not
// silently weaken the policy.
func LoadFile(path string) (File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return File{}, fmt.Errorf("policy: read %s: %w", path, err)
	}
	var f File
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return File{}, fmt.Errorf("policy: decode %s: %w", path, err)
	}
	if dec.More() {
		return File{}, fmt.Errorf("policy: decode %s: trailing data after the JSON object", path)
	}
	return f, nil
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
	listed    []pattern
	extraKeys []string // sorted, lowercase
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

// builtinKeys are the query keys GCE defines for /computeMetadata/v1/, in the order
// the canonical query lists them.
var builtinKeys = []string{"recursive", "alt", "wait_for_change", "last_etag", "timeout_sec"}

// identityKeys are the identity endpoint's query keys; only exposed pods reach it.
var identityKeys = []string{"audience", "format", "licenses"}

// MaxTimeoutSec is the longest long poll GCE accepts.
const MaxTimeoutSec = 3600

// New validates cfg and builds a Policy.
func New(cfg Config) (*Policy, error) {
	p := &Policy{recursive: cfg.Recursive}
	for _, b := range builtinPatterns {
		p.concealed = append(p.concealed, b)
		if b.rule != RuleIdentity {
			p.listed = append(p.listed, b)
		}
	}
	for _, raw := range cfg.File.ConcealPaths {
		segs, err := parsePattern(raw)
		if err != nil {
			return nil, err
		}
		pat := pattern{segs: segs, rule: RuleConcealedPath}
		p.concealed = append(p.concealed, pat)
		p.listed = append(p.listed, pat)
	}
	for _, k := range cfg.File.AllowQueryKeys {
		lk := strings.ToLower(k)
		if lk == "" || !isQueryKeyToken(lk) {
			return nil, fmt.Errorf("policy: allowQueryKeys: %q is not a plain query key (letters, digits, '_', '-', '.')", k)
		}
		if slices.Contains(builtinKeys, lk) {
			return nil, fmt.Errorf("policy: allowQueryKeys: %q is built in and governed by the policy itself", k)
		}
		if !slices.Contains(p.extraKeys, lk) {
			p.extraKeys = append(p.extraKeys, lk)
		}
	}
	slices.Sort(p.extraKeys)
	return p, nil
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

func parsePattern(raw string) ([]string, error) {
	trimmed := strings.Trim(raw, "/")
	if trimmed == "" {
		return nil, fmt.Errorf("policy: concealPaths: %q is empty: it would conceal the whole tree", raw)
	}
	segs := strings.Split(strings.ToLower(trimmed), "/")
	for _, s := range segs {
		if s == "" || s == "." || s == ".." || strings.ContainsAny(s, "%\\?#;") {
			return nil, fmt.Errorf("policy: concealPaths: %q: segment %q is not a plain path segment (relative to /computeMetadata/v1/, '*' for any one segment)", raw, s)
		}
	}
	return segs, nil
}

func isQueryKeyToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
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
	switch {
	case len(segs) == 0:
		d.Rule = RuleDiscovery
	case segs[0] == "computeMetadata":
		switch {
		case len(segs) == 1:
			d.Rule = RuleDiscovery
		case segs[1] == "v1":
			d.Rule = RuleV1
			rest = segs[2:]
		case strings.EqualFold(segs[1], "v1beta1"):
			d.Verdict, d.Rule = Deny, RuleLegacyAPI
			return d
		default:
			d.Verdict, d.Rule = Deny, RuleUnknownAPIVersion
			return d
		}
	case segs[0] == "0.1":
		d.Verdict, d.Rule = Deny, RuleLegacyAPI
		return d
	default:
		d.Verdict, d.Rule = Deny, RuleUnknownAPIVersion
		return d
	}
	inV1 := d.Rule == RuleV1

	exposedHit := false // something only an exposed pod may have
	extraKeys := p.extraKeys
	if inV1 {
		if r := p.concealedRule(rest); r != 0 {
			if !p.exposed {
				d.Verdict, d.Rule = Conceal, r
				return d
			}
			exposedHit = true
			if r == RuleIdentity {
				extraKeys = append(slices.Clip(identityKeys), p.extraKeys...)
			}
		}
	}

	if hasQuery && rawQuery != "" {
		q, rule := p.parseQuery(rawQuery, extraKeys)
		if rule != 0 {
			d.Verdict, d.Rule = Deny, rule
			return d
		}
		if q.has(keyRecursive) {
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
				return d
			}
			d.Recursive = q.values[keyRecursive] == "true"
			if d.Recursive && !p.exposed {
				switch {
				case q.values[keyAlt] != "text":
					d.FilterListing = true
				case p.holdsListed(rest):
					d.Verdict, d.Rule = Deny, RuleRecursiveAltText
					return d
				}
				// A text listing of a directory that holds no listed concealed entry
				// (a service account's: identity tokens are never listed) has nothing
				// to remove, and is not JSON: it passes as it is.
			}
		}
		d.WaitForChange = q.values[keyWaitForChange] == "true"
		d.TimeoutSec = q.timeoutSec
		d.RawQuery = q.canonical(extraKeys)
	}
	if exposedHit {
		d.Rule = RuleExposedPod
	}
	return d
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

// canonicalPath percent-decodes rawPath once and resolves dot segments and empty
// segments. It returns the canonical path (rawPath itself when already canonical, so
// the common case does not allocate) or the rule that refuses it.
func canonicalPath(rawPath string) (string, Rule) {
	needsDecode, needsClean := false, false
	for i := 0; i < len(rawPath); i++ {
		c := rawPath[i]
		switch {
		case c < 0x20 || c >= 0x7f || c == '\\' || c == '#' || c == ';':
			return "", RuleBadCharacter
		case c == '%':
			needsDecode = true
		case c == '/':
			if i+1 < len(rawPath) && rawPath[i+1] == '/' {
				needsClean = true
			}
		case c == '.':
			if rawPath[i-1] == '/' { // rawPath[0] is '/', so i >= 1 here
				needsClean = true
			}
		}
	}
	if !needsDecode && !needsClean {
		return rawPath, 0
	}
	path := rawPath
	if needsDecode {
		decoded, rule := decodePath(rawPath)
		if rule != 0 {
			return "", rule
		}
		path = decoded
	}
	return cleanPath(path)
}

func decodePath(s string) (string, Rule) {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			return "", RuleBadEscape
		}
		d := unhex(s[i+1])<<4 | unhex(s[i+2])
		// Decoding happens once. A '%' left after it is double encoding, which another
		// decoder along the way could read differently: refuse it, and every byte that
		// could not appear raw either.
		if d < 0x20 || d >= 0x7f || d == '%' || d == '\\' || d == '?' || d == '#' || d == ';' {
			return "", RuleBadEscape
		}
		b.WriteByte(d)
		i += 2
	}
	return b.String(), 0
}

func cleanPath(path string) (string, Rule) {
	raw := strings.Split(path[1:], "/")
	last := raw[len(raw)-1]
	trailing := last == "" || last == "." || last == ".."
	out := make([]string, 0, len(raw))
	for _, seg := range raw {
		switch seg {
		case "", ".":
		case "..":
			if len(out) == 0 {
				return "", RuleBadPath
			}
			out = out[:len(out)-1]
		default:
			out = append(out, seg)
		}
	}
	if len(out) == 0 {
		return "/", 0
	}
	s := "/" + strings.Join(out, "/")
	if trailing {
		s += "/"
	}
	return s, 0
}

// splitSegments splits a canonical path into its segments, appending to buf.
func splitSegments(canon string, buf []string) []string {
	s := strings.Trim(canon, "/")
	if s == "" {
		return buf
	}
	for seg := range strings.SplitSeq(s, "/") {
		buf = append(buf, seg)
	}
	return buf
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// SplitV1 returns the segments of a canonical path under /computeMetadata/v1/ and true,
// or false when the path is not there.
func SplitV1(canon string) ([]string, bool) {
	segs := splitSegments(canon, nil)
	if len(segs) < 2 || segs[0] != "computeMetadata" || segs[1] != "v1" {
		return nil, false
	}
	return segs[2:], true
}
