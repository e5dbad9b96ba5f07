package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// FilterListing removes concealed entries from a recursive JSON listing of the
// directory canonPath (a canonical path under /computeMetadata/v1/). GCE spells
// directory names in camelCase in these listings (serviceAccounts) and keeps attribute
// names as they are (kube-env), so both spellings are matched. Any key named kube-env,
// in any case or spelling, is removed wherever it is.
//
// A listing that is not JSON, or a directory outside /computeMetadata/v1/, is an
// error: the caller must then withhold the answer.
func (p *Policy) FilterListing(canonPath string, body []byte) ([]byte, error) {
	dir, ok := SplitV1(canonPath)
	if !ok {
		return nil, fmt.Errorf("policy: %q is not under /computeMetadata/v1/", canonPath)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var root any
	if err := dec.Decode(&root); err != nil {
		return nil, fmt.Errorf("policy: decode recursive listing of %s: %w", canonPath, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("policy: recursive listing of %s: trailing data after the JSON value", canonPath)
	}
	path := append([]string(nil), dir...)
	if !p.filterValue(path, root) {
		return body, nil
	}
	out, err := json.Marshal(root)
	if err != nil {
		return nil, fmt.Errorf("policy: encode filtered listing of %s: %w", canonPath, err)
	}
	return out, nil
}

// filterValue deletes concealed entries below the value at path in place and reports
// whether it deleted anything. Arrays (network-interfaces/0/...) are walked with
// their indexes as path segments.
func (p *Policy) filterValue(path []string, value any) bool {
	changed := false
	switch v := value.(type) {
	case map[string]any:
		for key, child := range v {
			kebab := camelToKebab(key)
			if p.concealedRule(append(path, key)) != 0 || p.concealedRule(append(path, kebab)) != 0 ||
				strings.EqualFold(strings.ReplaceAll(kebab, "_", "-"), "kube-env") {
				delete(v, key)
				changed = true
				continue
			}
			if p.filterValue(append(path, kebab), child) {
				changed = true
			}
		}
	case []any:
		for i, child := range v {
			if p.filterValue(append(path, strconv.Itoa(i)), child) {
				changed = true
			}
		}
	}
	return changed
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
