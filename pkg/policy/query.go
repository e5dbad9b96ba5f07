package policy

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
)

const (
	keyRecursive = iota
	keyAlt
	keyWaitForChange
	keyLastETag
	keyTimeoutSec
	numBuiltinKeys
)

type extraParam struct{ key, value string }

// query is a parsed, validated query: one value per key, in canonical spelling.
type query struct {
	present    uint8 // bit i set when builtin key i was given
	values     [numBuiltinKeys]string
	timeoutSec int
	extra      []extraParam
}

func (q *query) has(key int) bool { return q.present&(1<<key) != 0 }

// parseQuery validates rawQuery (without '?') and returns it parsed, or the rule that
// refuses it. Keys are decoded once and matched case-insensitively, so every spelling
// of a key (Recursive, re%63ursive) is that key.
func (p *Policy) parseQuery(rawQuery string, extraKeys []string) (query, Rule) {
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
			if !slices.Contains(extraKeys, key) {
				return q, RuleUnknownQueryKey
			}
			for _, e := range q.extra {
				if e.key == key {
					return q, RuleDuplicateQueryKey
				}
			}
			q.extra = append(q.extra, extraParam{key: key, value: value})
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

func builtinKeyIndex(key string) int {
	for i, k := range builtinKeys {
		if k == key {
			return i
		}
	}
	return -1
}

// canonicalValue validates a builtin key's decoded value and returns its one spelling.
func canonicalValue(idx int, v string) (string, bool) {
	switch idx {
	case keyRecursive, keyWaitForChange:
		switch {
		case strings.EqualFold(v, "true"):
			return "true", true
		case strings.EqualFold(v, "false"):
			return "false", true
		}
		return "", false
	case keyAlt:
		switch {
		case strings.EqualFold(v, "json"):
			return "json", true
		case strings.EqualFold(v, "text"):
			return "text", true
		}
		return "", false
	case keyLastETag:
		if len(v) > 64 {
			return "", false
		}
		for i := 0; i < len(v); i++ {
			c := v[i]
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '_') {
				return "", false
			}
		}
		return v, true
	case keyTimeoutSec:
		if v == "" || len(v) > 4 {
			return "", false
		}
		n := 0
		for i := 0; i < len(v); i++ {
			if v[i] < '0' || v[i] > '9' {
				return "", false
			}
			n = n*10 + int(v[i]-'0')
		}
		if n > MaxTimeoutSec {
			return "", false
		}
		return strconv.Itoa(n), true
	}
	return "", false
}

// decodeQueryComponent decodes %XX and '+' once. A '%' or control byte left after
// decoding refuses the component: double encoding is read differently by different
// decoders.
func decodeQueryComponent(s string) (string, bool) {
	if strings.IndexByte(s, '%') < 0 && strings.IndexByte(s, '+') < 0 {
		return s, true
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '+':
			b.WriteByte(' ')
		case '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return "", false
			}
			d := unhex(s[i+1])<<4 | unhex(s[i+2])
			if d < 0x20 || d >= 0x7f || d == '%' || d == '\\' {
				return "", false
			}
			b.WriteByte(d)
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), true
}

// canonical renders the query in one spelling: builtin keys in a fixed order, then
// extra keys in the policy's order, every value re-encoded.
func (q *query) canonical(extraKeys []string) string {
	if q.present == 0 && len(q.extra) == 0 {
		return ""
	}
	var b strings.Builder
	for i, k := range builtinKeys {
		if !q.has(i) {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(q.values[i]) // builtin values are plain tokens
	}
	for _, k := range extraKeys {
		for _, e := range q.extra {
			if e.key != k {
				continue
			}
			if b.Len() > 0 {
				b.WriteByte('&')
			}
			b.WriteString(url.QueryEscape(e.key))
			b.WriteByte('=')
			b.WriteString(url.QueryEscape(e.value))
		}
	}
	return b.String()
}
