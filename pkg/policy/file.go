package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// File is the optional policy file (JSON). Defaults reproduce GKE's concealment.
//
// The file is read strictly, because an entry that loads cleanly and conceals nothing
// is worse than an error: unknown fields, duplicate keys, null anywhere, whitespace in
// an entry, and paths that do not start with instance/ or project/ are errors naming
// the entry.
type File struct {
	// ConcealPaths are extra paths relative to /computeMetadata/v1/ to conceal, with the
	// same strength as kube-env: case-insensitive, the path and everything under it,
	// and removed from recursive listings. "*" matches one segment.
	// Example: "instance/attributes/kube-labels", "instance/service-accounts/*/token".
	ConcealPaths []string `json:"concealPaths,omitempty"`
	// AllowQueryKeys are extra query keys passed upstream, each only on the paths it
	// names and only with values matching its pattern.
	AllowQueryKeys []QueryKey `json:"allowQueryKeys,omitempty"`
}

// QueryKey is one extra query key the policy file allows.
type QueryKey struct {
	// Key is the query key (letters, digits, '_', '-', '.'), matched case-insensitively.
	Key string `json:"key"`
	// Paths are the paths (relative to /computeMetadata/v1/, "*" for one segment)
	// where the key is allowed; a path matches exactly, not its descendants.
	Paths []string `json:"paths"`
	// Value is a regular expression (RE2) the whole decoded value must match.
	Value string `json:"value"`
}

// maxExtraValue bounds an extra key's value, whatever its pattern says.
const maxExtraValue = 1024

// ParseFile parses and validates the policy file's content, strictly (see File). The
// package does no I/O: the caller reads the file (metaconceal-proxy's --policy) and
// names it in the error.
func ParseFile(data []byte) (File, error) {
	if err := checkJSONStrict(data); err != nil {
		return File{}, err
	}
	var f File
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return File{}, fmt.Errorf("decode: %w", err)
	}
	if _, err := compileFile(f); err != nil {
		return File{}, err
	}
	return f, nil
}

// checkJSONStrict walks the JSON token stream: one top-level object, no null
// anywhere, no key given twice in one object, nothing after the object.
func checkJSONStrict(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("the policy file must be one JSON object, not %s", describeToken(tok))
	}
	if err := checkObject(dec, ""); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// checkObject reads an object's members after its '{'.
func checkObject(dec *json.Decoder, where string) error {
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("decode%s: %w", at(where), err)
		}
		key := tok.(string) // object keys are strings
		name := where + "." + key
		if where == "" {
			name = key
		}
		if seen[key] {
			obj := where
			if obj == "" {
				obj = "the top-level object"
			}
			return fmt.Errorf("%s: key %q given twice (one would silently replace the other)", obj, key)
		}
		seen[key] = true
		if err := checkValue(dec, name); err != nil {
			return err
		}
	}
	_, err := dec.Token() // '}'
	return err
}

func checkValue(dec *json.Decoder, where string) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("decode%s: %w", at(where), err)
	}
	switch t := tok.(type) {
	case nil:
		return fmt.Errorf("%s: null is not allowed (leave the field out instead)", where)
	case json.Delim:
		switch t {
		case '{':
			return checkObject(dec, where)
		case '[':
			for i := 0; dec.More(); i++ {
				if err := checkValue(dec, where+"["+strconv.Itoa(i)+"]"); err != nil {
					return err
				}
			}
			_, err := dec.Token() // ']'
			return err
		}
	}
	return nil
}

func at(where string) string {
	if where == "" {
		return ""
	}
	return " at " + where
}

func describeToken(tok json.Token) string {
	switch t := tok.(type) {
	case nil:
		return "null"
	case json.Delim:
		return string(t)
	case string:
		return "a string"
	case bool:
		return "a boolean"
	}
	return "a number"
}

// compiled is the validated policy file.
type compiled struct {
	conceal []pattern
	keys    []extraKey
}

// extraKey is a policy-file query key, validated.
type extraKey struct {
	key   string // lowercase
	paths [][]string
	value *regexp.Regexp // anchored
	src   string         // the pattern as written, for the start-up log
}

func compileFile(f File) (compiled, error) {
	var c compiled
	seen := map[string]bool{}
	for i, raw := range f.ConcealPaths {
		name := fmt.Sprintf("concealPaths[%d] %q", i, raw)
		segs, err := parsePattern(raw)
		if err != nil {
			return c, fmt.Errorf("%s: %w", name, err)
		}
		joined := strings.Join(segs, "/")
		if seen[joined] {
			return c, fmt.Errorf("%s: listed twice", name)
		}
		seen[joined] = true
		c.conceal = append(c.conceal, pattern{segs: segs, rule: RuleConcealedPath})
	}
	seenKeys := map[string]bool{}
	for i, qk := range f.AllowQueryKeys {
		name := fmt.Sprintf("allowQueryKeys[%d] (key %q)", i, qk.Key)
		lk := strings.ToLower(qk.Key)
		switch {
		case lk == "" || !isQueryKeyToken(lk):
			return c, fmt.Errorf("%s: not a plain query key (letters, digits, '_', '-', '.')", name)
		case builtinKeyIndex(lk) >= 0:
			return c, fmt.Errorf("%s: built in and governed by the policy itself", name)
		case seenKeys[lk]:
			return c, fmt.Errorf("%s: listed twice", name)
		case len(qk.Paths) == 0:
			return c, fmt.Errorf("%s: no paths: say where the key is allowed", name)
		case qk.Value == "":
			return c, fmt.Errorf("%s: no value pattern: say which values are allowed", name)
		}
		seenKeys[lk] = true
		if strings.TrimSpace(qk.Value) != qk.Value {
			return c, fmt.Errorf("%s: value pattern %q has leading or trailing whitespace", name, qk.Value)
		}
		re, err := regexp.Compile(`^(?:` + qk.Value + `)$`)
		if err != nil {
			return c, fmt.Errorf("%s: value pattern %q: %w", name, qk.Value, err)
		}
		ek := extraKey{key: lk, value: re, src: qk.Value}
		for j, p := range qk.Paths {
			segs, err := parsePattern(p)
			if err != nil {
				return c, fmt.Errorf("%s: paths[%d] %q: %w", name, j, p, err)
			}
			ek.paths = append(ek.paths, segs)
		}
		c.keys = append(c.keys, ek)
	}
	return c, nil
}

// parsePattern validates a path pattern relative to /computeMetadata/v1/.
func parsePattern(raw string) ([]string, error) {
	if raw == "" {
		return nil, errors.New("empty: it would conceal the whole tree")
	}
	for i := 0; i < len(raw); i++ {
		if c := raw[i]; c <= ' ' || c >= 0x7f {
			return nil, errors.New("whitespace, control or non-ASCII character: a path is written exactly, without spaces")
		}
	}
	lower := strings.ToLower(raw)
	if !strings.HasPrefix(lower, "instance/") && !strings.HasPrefix(lower, "project/") {
		return nil, errors.New("does not start with instance/ or project/: paths are relative to /computeMetadata/v1/ (e.g. instance/attributes/kube-labels)")
	}
	segs := strings.Split(lower, "/")
	for _, s := range segs {
		switch {
		case s == "":
			return nil, errors.New("empty segment (double or trailing slash)")
		case s == "." || s == "..":
			return nil, fmt.Errorf("dot segment %q", s)
		case s == "*":
		default:
			for i := 0; i < len(s); i++ {
				c := s[i]
				if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '@') {
					return nil, fmt.Errorf("segment %q: only letters, digits, '-', '_', '.', '@', or '*' alone for any one segment", s)
				}
			}
		}
	}
	return segs, nil
}

// isQueryKeyToken: a policy-file query key is letters, digits, '_', '-', '.'.
func isQueryKeyToken(s string) bool {
	return allBytes(s, func(c byte) bool {
		return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.'
	})
}
