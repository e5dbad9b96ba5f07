package policy

import (
	"net/url"
	"strconv"
	"strings"
)

// Query keys are data with a grammar, never free text: each key is allowed only on the
// paths where GCE defines it, and only with values GCE's grammar for it allows. The
// upstream request is rebuilt from the parsed values, so a lenient upstream that reads
// its query loosely (any value mentioning "recursive" as a recursive listing, say) is
// never handed a value it could misread.
const (
	keyRecursive = iota
	keyAlt
	keyWaitForChange
	keyLastETag
	keyTimeoutSec
	keyScopes
	keyAudience
	keyFormat
	keyLicenses
	numBuiltinKeys
)

// builtinKeys are the query keys GCE defines, in the order the canonical query lists
// them (indexed by the key* constants).
var builtinKeys = [numBuiltinKeys]string{"recursive", "alt", "wait_for_change", "last_etag", "timeout_sec", "scopes", "audience", "format", "licenses"}

// Grammar bounds.
const (
	// MaxTimeoutSec is the longest long poll GCE accepts.
	MaxTimeoutSec = 3600
	// maxETag is the longest last_etag accepted (GCE's are 16 hex digits).
	maxETag = 64
	// ScopePrefix starts every scope a token request may name.
	ScopePrefix = "https://www.googleapis.com/auth/"
	maxScopes   = 64
	maxScopeLen = 128
	maxAudience = 512
)

type extraParam struct {
	key   int // index into Policy.extra
	value string
}

// query is a parsed, validated query: one value per key, in canonical spelling.
type query struct {
	present    uint16 // bit i set when builtin key i was given
	values     [numBuiltinKeys]string
	timeoutSec int
	extra      []extraParam
}

func (q *query) has(key int) bool { return q.present&(1<<key) != 0 }

// parseQuery validates rawQuery (without '?') and returns it parsed, or the rule that
// refuses it. Keys are decoded once and matched case-insensitively, so every spelling
// of a key (Recursive, re%63ursive) is that key. Where each key may appear is checked
// by scopeRule once the path is known.
func (p *Policy) parseQuery(rawQuery string) (query, Rule) {
	q := query{timeoutSec: -1}
	for i := 0; i < len(rawQuery); i++ {
		c := rawQuery[i]
		if c == ';' {
			return q, RuleSemicolonInQuery
		}
		if c < 0x20 || c >= 0x7f || c == '\\' || c == '#' {
			return q, RuleBadCharacter
		}
	}
	for part := range strings.SplitSeq(rawQuery, "&") {
		if part == "" {
			continue
		}
		rawKey, rawValue, _ := strings.Cut(part, "=")
		key, ok := decodeQueryComponent(rawKey)
		if !ok {
			return q, RuleBadEscape
		}
		value, ok := decodeQueryComponent(rawValue)
		if !ok {
			return q, RuleBadEscape
		}
		key = strings.ToLower(key)
		idx := builtinKeyIndex(key)
		if idx < 0 {
			x := p.extraKeyIndex(key)
			if x < 0 {
				return q, RuleUnknownQueryKey
			}
			for _, e := range q.extra {
				if e.key == x {
					return q, RuleDuplicateQueryKey
				}
			}
			if len(value) > maxExtraValue || !p.extra[x].value.MatchString(value) {
				return q, RuleBadQueryValue
			}
			q.extra = append(q.extra, extraParam{key: x, value: value})
			continue
		}
		if q.has(idx) {
			return q, RuleDuplicateQueryKey
		}
		q.present |= 1 << idx
		canon, ok := canonicalValue(idx, value)
		if !ok {
			return q, RuleBadQueryValue
		}
		q.values[idx] = canon
		if idx == keyTimeoutSec {
			q.timeoutSec, _ = strconv.Atoi(canon) // canonicalValue checked the digits
		}
	}
	return q, 0
}

// scopeRule returns RuleQueryKeyPath when a key was given on a path where GCE does
// not define it, or 0. rest is the path under /computeMetadata/v1/ (inV1) or nil.
// recursive is checked by Evaluate itself.
func (p *Policy) scopeRule(q *query, rest []string, inV1 bool) Rule {
	const v1Keys = 1<<keyAlt | 1<<keyWaitForChange | 1<<keyLastETag | 1<<keyTimeoutSec
	if q.present&v1Keys != 0 && !inV1 {
		return RuleQueryKeyPath
	}
	if q.has(keyScopes) && !(inV1 && isAccountEntry(rest, "token")) {
		return RuleQueryKeyPath
	}
	const identityKeys = 1<<keyAudience | 1<<keyFormat | 1<<keyLicenses
	if q.present&identityKeys != 0 && !(inV1 && isAccountEntry(rest, "identity")) {
		return RuleQueryKeyPath
	}
	for _, e := range q.extra {
		if !inV1 || !p.extra[e.key].allowedOn(rest) {
			return RuleQueryKeyPath
		}
	}
	return 0
}

// isAccountEntry reports whether rest is instance/service-accounts/<account>/<entry>.
func isAccountEntry(rest []string, entry string) bool {
	return len(rest) == 4 && strings.EqualFold(rest[0], "instance") &&
		strings.EqualFold(rest[1], "service-accounts") && strings.EqualFold(rest[3], entry)
}

func (k *extraKey) allowedOn(rest []string) bool {
	for _, pat := range k.paths {
		if matchExact(pat, rest) {
			return true
		}
	}
	return false
}

func builtinKeyIndex(key string) int {
	for i, k := range builtinKeys {
		if k == key {
			return i
		}
	}
	return -1
}

func (p *Policy) extraKeyIndex(key string) int {
	for i := range p.extra {
		if p.extra[i].key == key {
			return i
		}
	}
	return -1
}

// canonicalValue validates a builtin key's decoded value against GCE's grammar for it
// and returns its one spelling.
func canonicalValue(idx int, v string) (string, bool) {
	switch idx {
	case keyRecursive, keyWaitForChange:
		switch {
		case strings.EqualFold(v, "true"):
			return "true", true
		case strings.EqualFold(v, "false"):
			return "false", true
		}
	case keyAlt:
		switch {
		case strings.EqualFold(v, "json"):
			return "json", true
		case strings.EqualFold(v, "text"):
			return "text", true
		}
	case keyLastETag:
		// Hex digits, as GCE's ETags and Kubernetes' e2e (last_etag=d34db33f) spell
		// them; empty is what clients send before they have seen an ETag.
		if len(v) <= maxETag && allBytes(v, isHex) {
			return v, true
		}
	case keyTimeoutSec:
		if v == "" || len(v) > 4 || !allBytes(v, isDigit) {
			return "", false
		}
		n, _ := strconv.Atoi(v)
		if n <= MaxTimeoutSec {
			return strconv.Itoa(n), true
		}
	case keyScopes:
		return v, validScopes(v)
	case keyAudience:
		return v, v != "" && len(v) <= maxAudience && allBytes(v, isAudienceByte)
	case keyFormat:
		switch {
		case strings.EqualFold(v, "standard"):
			return "standard", true
		case strings.EqualFold(v, "full"):
			return "full", true
		}
	case keyLicenses:
		switch {
		case strings.EqualFold(v, "true"):
			return "TRUE", true
		case strings.EqualFold(v, "false"):
			return "FALSE", true
		}
	}
	return "", false
}

// validScopes checks a comma-separated list of OAuth scope URLs, as Google's auth
// libraries send them (scopes=https://www.googleapis.com/auth/cloud-platform,...).
func validScopes(v string) bool {
	if v == "" {
		return false
	}
	n := 0
	for s := range strings.SplitSeq(v, ",") {
		n++
		name, ok := strings.CutPrefix(s, ScopePrefix)
		if !ok || n > maxScopes || name == "" || len(s) > maxScopeLen || !allBytes(name, isScopeByte) ||
			name[0] == '.' || name[0] == '/' || strings.Contains(name, "..") || strings.Contains(name, "//") {
			return false
		}
	}
	return true
}

func allBytes(s string, ok func(byte) bool) bool {
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isScopeByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' || c == '/'
}

// isAudienceByte: an audience is a URL or a plain name; no space, quote or '%' (the
// value is decoded once, so a '%' would be double encoding).
func isAudienceByte(c byte) bool {
	return c > ' ' && c < 0x7f && !strings.ContainsRune("%\"<>\\^`{|}", rune(c))
}

// decodeQueryComponent decodes a query key or value once (%XX and '+'); a control
// byte, '%' or '\' left after decoding refuses it.
func decodeQueryComponent(s string) (string, bool) {
	return percentDecodeOnce(s, true, `\`)
}

// canonical renders the query in one spelling from the parsed values only: builtin
// keys in a fixed order, then extra keys in the policy's order. Builtin values are
// plain tokens (scopes: letters, digits and ":/._-," only, all legal raw in a query);
// audience and extra values are re-encoded.
func (p *Policy) canonical(q *query) string {
	if q.present == 0 && len(q.extra) == 0 {
		return ""
	}
	var b strings.Builder
	for i, k := range builtinKeys {
		if !q.has(i) {
			continue
		}
		if i == keyRecursive && q.values[i] == "false" {
			// GCE's default, so nothing is lost; and a lenient upstream that reads any
			// mention of the key as a recursive listing would answer one, which the
			// proxy does not filter (Decision.Recursive is false).
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(k)
		b.WriteByte('=')
		if i == keyAudience {
			b.WriteString(url.QueryEscape(q.values[i]))
		} else {
			b.WriteString(q.values[i])
		}
	}
	for x := range p.extra {
		for _, e := range q.extra {
			if e.key != x {
				continue
			}
			if b.Len() > 0 {
				b.WriteByte('&')
			}
			b.WriteString(p.extra[x].key)
			b.WriteByte('=')
			b.WriteString(url.QueryEscape(e.value))
		}
	}
	return b.String()
}
