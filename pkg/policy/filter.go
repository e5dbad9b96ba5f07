package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Shape bounds of a recursive listing as GCE writes it.
const (
	maxListingDepth = 32
	maxListingKey   = 256
)

// ErrListingShape is wrapped by FilterListing's errors for answers that are not a
// recursive listing in GCE's JSON shape, or that still name a concealed endpoint
// after filtering: the caller must withhold the answer.
var ErrListingShape = errors.New("not a recursive listing in GCE's JSON shape")

// FilterListing removes concealed entries from a recursive JSON listing of the
// directory canonPath (a canonical path under /computeMetadata/v1/) and fails closed:
//
//   - the body must be one JSON value in GCE's shape: directories are objects whose
//     keys are single path segments (no '/', no control characters, not empty), nested
//     at most 32 deep; values are objects, arrays, strings, numbers or booleans. A
//     flat map of paths ({"instance/attributes/kube-env": ...}) is not that shape.
//   - entries whose key is concealed (GCE spells directories in camelCase in these
//     listings, serviceAccounts, and keeps attribute names as they are, kube-env: both
//     are matched), or whose key or string value names a concealed endpoint, are
//     removed; so are array strings naming one.
//   - afterwards no key or string in the answer may name a concealed endpoint;
//     otherwise the answer is an error.
//
// Any error means the caller must withhold the answer.
func (p *Policy) FilterListing(canonPath string, body []byte) ([]byte, error) {
	dir, ok := SplitV1(canonPath)
	if !ok {
		return nil, fmt.Errorf("policy: %q is not under /computeMetadata/v1/", canonPath)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var root any
	if err := dec.Decode(&root); err != nil {
		return nil, fmt.Errorf("policy: recursive listing of %s: %w: %w", canonPath, ErrListingShape, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("policy: recursive listing of %s: %w: trailing data after the JSON value", canonPath, ErrListingShape)
	}
	if err := checkShape(root, 0); err != nil {
		return nil, fmt.Errorf("policy: recursive listing of %s: %w: %w", canonPath, ErrListingShape, err)
	}
	if s, ok := root.(string); ok && p.namesConcealed(s) {
		return nil, fmt.Errorf("policy: recursive listing of %s: %w: the answer names a concealed endpoint", canonPath, ErrListingShape)
	}
	path := append([]string(nil), dir...)
	root, changed := p.filterValue(path, root)
	if where := p.findNamed(root, "$"); where != "" {
		return nil, fmt.Errorf("policy: recursive listing of %s: %w: %s still names a concealed endpoint after filtering", canonPath, ErrListingShape, where)
	}
	if !changed {
		return body, nil
	}
	out, err := json.Marshal(root)
	if err != nil {
		return nil, fmt.Errorf("policy: encode filtered listing of %s: %w", canonPath, err)
	}
	return out, nil
}

func checkShape(v any, depth int) error {
	if depth > maxListingDepth {
		return fmt.Errorf("nested deeper than %d", maxListingDepth)
	}
	switch t := v.(type) {
	case map[string]any:
		for k, child := range t {
			if k == "" || len(k) > maxListingKey || strings.ContainsRune(k, '/') || strings.IndexFunc(k, func(r rune) bool { return r < 0x20 || r == 0x7f }) >= 0 {
				return fmt.Errorf("key %.64q is not a single path segment", k)
			}
			if err := checkShape(child, depth+1); err != nil {
				return err
			}
		}
	case []any:
		for _, child := range t {
			if err := checkShape(child, depth+1); err != nil {
				return err
			}
		}
	case string, json.Number, bool:
	default:
		return fmt.Errorf("value of type %T", v) // null
	}
	return nil
}

// filterValue deletes concealed entries below the value at path and returns the
// value (arrays are rebuilt when they lose an element) and whether it deleted
// anything. Arrays (network-interfaces/0/...) are walked with their indexes as path
// segments.
func (p *Policy) filterValue(path []string, value any) (any, bool) {
	changed := false
	switch v := value.(type) {
	case map[string]any:
		for key, child := range v {
			kebab := camelToKebab(key)
			s, isString := child.(string)
			if p.concealedRule(append(path, key)) != 0 || p.concealedRule(append(path, kebab)) != 0 ||
				p.namesConcealed(key) || (isString && p.namesConcealed(s)) {
				delete(v, key)
				changed = true
				continue
			}
			if nv, c := p.filterValue(append(path, kebab), child); c {
				v[key] = nv
				changed = true
			}
		}
	case []any:
		kept := make([]any, 0, len(v))
		for i, child := range v {
			if s, ok := child.(string); ok && p.namesConcealed(s) {
				changed = true
				continue
			}
			nv, c := p.filterValue(append(path, strconv.Itoa(i)), child)
			changed = changed || c
			kept = append(kept, nv)
		}
		if changed {
			return kept, true
		}
	}
	return value, changed
}

// findNamed returns where in v a key or string names a concealed endpoint, or "".
func (p *Policy) findNamed(v any, where string) string {
	switch t := v.(type) {
	case map[string]any:
		for k, child := range t {
			if p.namesConcealed(k) {
				return where + "." + k
			}
			if w := p.findNamed(child, where+"."+k); w != "" {
				return w
			}
		}
	case []any:
		for i, child := range t {
			if w := p.findNamed(child, where+"["+strconv.Itoa(i)+"]"); w != "" {
				return w
			}
		}
	case string:
		if p.namesConcealed(t) {
			return where
		}
	}
	return ""
}

// namesConcealed reports whether s names a concealed endpoint: kube-env in any
// spelling (case, '_' for '-', camelCase, percent-encoding), or the path of a
// concealed pattern (identity tokens, the policy file's paths).
func (p *Policy) namesConcealed(s string) bool {
	for _, form := range spellings(s) {
		if strings.Contains(form, "kube-env") || strings.Contains(form, "kubeenv") {
			return true
		}
		for _, re := range p.namedRes {
			if re.MatchString(form) {
				return true
			}
		}
	}
	return false
}

// spellings are the forms of s a lenient reader could take for a path.
func spellings(s string) []string {
	lower := strings.ToLower(s)
	out := []string{strings.ReplaceAll(lower, "_", "-"), strings.ToLower(camelToKebab(s))}
	if strings.IndexByte(s, '%') >= 0 {
		out = append(out, strings.ReplaceAll(pctDecodeLenient(lower), "_", "-"))
	}
	return out
}

// pctDecodeLenient decodes every valid %XX escape once, leaving invalid ones as they
// are (as a lenient reader would), and lower-cases the result.
func pctDecodeLenient(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return strings.ToLower(b.String())
}

// namedRegexps builds, for each concealed pattern, a regexp finding its path in a
// lower-cased string: segments joined by one or more '/', '*' for any one segment.
func namedRegexps(pats []pattern) []*regexp.Regexp {
	var out []*regexp.Regexp
	for _, pat := range pats {
		parts := make([]string, len(pat.segs))
		for i, s := range pat.segs {
			if s == "*" {
				parts[i] = `[^/]+`
			} else {
				parts[i] = regexp.QuoteMeta(s)
			}
		}
		out = append(out, regexp.MustCompile(strings.Join(parts, `/+`)))
	}
	return out
}

// camelToKebab turns serviceAccounts into service-accounts; other keys are unchanged.
func camelToKebab(s string) string {
	hasUpper := false
	for i := 0; i < len(s); i++ {
		if s[i] >= 'A' && s[i] <= 'Z' {
			hasUpper = true
			break
		}
	}
	if !hasUpper {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'A' && c <= 'Z' {
			if i > 0 {
				b.WriteByte('-')
			}
			c += 'a' - 'A'
		}
		b.WriteByte(c)
	}
	return b.String()
}
