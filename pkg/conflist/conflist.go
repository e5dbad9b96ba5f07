// Package conflist finds the CNI network configuration a container runtime uses on a
// node and edits the metaconceal entry in it.
//
// The edits are byte splices, not a decode and re-encode: inserting the entry adds
// `,` + the whitespace that preceded the last plugin + the entry right after the last
// plugin, and removing it takes exactly those bytes away again. Every other byte of
// the file (key order, unknown fields, number spelling, indentation, odd layouts such
// as kindnet's tab-indented template) is left as it was, so that uninstall gives back
// the original file byte for byte. Only a single-plugin .conf (or .json) file is
// re-serialised, because it has to become a .conflist: its object is re-indented with
// encoding/json's Indent, which keeps key order and every value as written.
package conflist

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

// PluginType is the CNI type of the metaconceal plugin and the name of its binary.
const PluginType = "metaconceal"

// ConvertedFromKey is the top-level key a conflist made from a single-plugin .conf
// carries, naming the file it was made from, so that uninstall can give that file back.
// libcni ignores unknown top-level keys of a conflist and never passes them to plugins.
const ConvertedFromKey = "metaconcealConvertedFrom"

// Action says what an edit did to a file.
type Action string

const (
	// Added: the entry was appended to the plugins list.
	Added Action = "added"
	// Replaced: an entry with other settings (or duplicates, or one in first
	// position where it cannot chain) was rewritten.
	Replaced Action = "replaced"
	// Unchanged: the entry was already there with the wanted settings.
	Unchanged Action = "unchanged"
	// Converted: a single-plugin .conf/.json became a .conflist with the entry.
	Converted Action = "converted"
	// Removed: the entry was taken out.
	Removed Action = "removed"
	// Reverted: a conflist this package made from a .conf was turned back into it.
	Reverted Action = "reverted"
	// Absent: there was no entry to remove.
	Absent Action = "absent"
)

// SupportedVersions are the CNI spec versions the plugin implements. Chaining needs
// 0.3.0 or later (prevResult); a list of another version would make every pod ADD on
// the node fail, so such a list is refused rather than patched.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func checkVersion(v string) error {
	if slices.Contains(SupportedVersions, v) {
		return nil
	}
	return fmt.Errorf("%w: cniVersion %q: %s supports %s", ErrNotChainable, v, PluginType, strings.Join(SupportedVersions, ", "))
}

// ErrNotChainable reports a configuration the entry cannot be chained into: the file is
// left alone.
var ErrNotChainable = errors.New("configuration cannot take a chained plugin")

// Entry is the metaconceal plugin's conflist entry. The installer owns it: an entry
// with other settings is replaced by this one.
type Entry struct {
	Mode              string
	Proxy             string
	ALTS              string
	ExcludeNamespaces []string
}

// entryJSON fixes the key order of the written entry: type first, as people write it.
type entryJSON struct {
	Type              string   `json:"type"`
	Mode              string   `json:"mode,omitempty"`
	Proxy             string   `json:"proxy,omitempty"`
	ALTS              string   `json:"alts,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

// Marshal renders the entry; with a non-empty indent it is multi-line, every line after
// the first starting with prefix, as json.MarshalIndent does.
func (e Entry) Marshal(prefix, indent string) ([]byte, error) {
	v := entryJSON{Type: PluginType, Mode: e.Mode, Proxy: e.Proxy, ALTS: e.ALTS, ExcludeNamespaces: e.ExcludeNamespaces}
	if indent == "" {
		return json.Marshal(v)
	}
	return json.MarshalIndent(v, prefix, indent)
}

// element is one item of the plugins array, as a byte range of the file.
type element struct {
	start, end int
	typ        string
}

// document is a parsed conflist: where its plugins array and elements are.
type document struct {
	data        []byte
	hasPlugins  bool
	elements    []element
	topKeys     []string
	convertedOf string // value of ConvertedFromKey, if any
	version     string // the list's effective cniVersion, as libcni reads it
}

// parseConflist checks that data is a conflist the runtime can load (libcni parses it)
// and locates the plugins array's elements.
func parseConflist(data []byte) (*document, error) {
	if err := checkJSON(data); err != nil {
		return nil, err
	}
	list, err := libcni.NetworkConfFromBytes(data)
	if err != nil {
		return nil, fmt.Errorf("the runtime could not load it: %w", err)
	}
	doc := &document{data: data, version: list.CNIVersion}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("top level is not a JSON object")
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("reading key: %w", err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return nil, fmt.Errorf("top-level key %q appears twice; refusing to guess which one counts", key)
		}
		seen[key] = true
		doc.topKeys = append(doc.topKeys, key)
		switch key {
		case "plugins":
			if err := doc.readPlugins(dec); err != nil {
				return nil, err
			}
		case ConvertedFromKey:
			if err := dec.Decode(&doc.convertedOf); err != nil {
				return nil, fmt.Errorf("key %q: %w", ConvertedFromKey, err)
			}
		default:
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, fmt.Errorf("key %q: %w", key, err)
			}
		}
	}
	if !doc.hasPlugins {
		return nil, fmt.Errorf("%w: no \"plugins\" list (plugin configs loaded from a directory are not supported)", ErrNotChainable)
	}
	if len(doc.elements) == 0 {
		return nil, fmt.Errorf("%w: the \"plugins\" list is empty", ErrNotChainable)
	}
	return doc, nil
}

func (doc *document) readPlugins(dec *json.Decoder) error {
	doc.hasPlugins = true
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("key \"plugins\": %w", err)
	}
	if tok != json.Delim('[') {
		return fmt.Errorf("key \"plugins\" is not a list")
	}
	for dec.More() {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return fmt.Errorf("plugins[%d]: %w", len(doc.elements), err)
		}
		end := int(dec.InputOffset())
		start := end - len(raw)
		if start < 0 || !bytes.Equal(doc.data[start:end], raw) {
			return fmt.Errorf("plugins[%d]: cannot locate its bytes in the file", len(doc.elements))
		}
		var head struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(raw, &head); err != nil {
			return fmt.Errorf("plugins[%d] is not an object: %w", len(doc.elements), err)
		}
		doc.elements = append(doc.elements, element{start: start, end: end, typ: head.Type})
	}
	if _, err := dec.Token(); err != nil { // the closing ]
		return fmt.Errorf("key \"plugins\": %w", err)
	}
	return nil
}

// ours lists the indexes of metaconceal entries.
func (doc *document) ours() []int {
	var idx []int
	for i, e := range doc.elements {
		if e.typ == PluginType {
			idx = append(idx, i)
		}
	}
	return idx
}

// checkJSON refuses anything json.Unmarshal (and so libcni) refuses, naming the offset.
func checkJSON(data []byte) error {
	if json.Valid(data) {
		return nil
	}
	var v any
	err := json.Unmarshal(data, &v)
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Errorf("not valid JSON at byte offset %d: %w", syn.Offset, err)
	}
	return fmt.Errorf("not valid JSON: %w", err)
}

// leadingSpace returns the whitespace just before offset i.
func leadingSpace(data []byte, i int) []byte {
	j := i
	for j > 0 && isSpace(data[j-1]) {
		j--
	}
	return data[j:i]
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// renderEntry formats the entry to sit where an element preceded by ws sits: on its own
// lines with the element's indentation when the file is multi-line, compact otherwise.
func renderEntry(data []byte, e element, ws []byte, entry Entry) ([]byte, error) {
	nl := bytes.LastIndexByte(ws, '\n')
	if nl < 0 {
		return entry.Marshal("", "")
	}
	elemIndent := string(ws[nl+1:])
	return entry.Marshal(elemIndent, indentUnit(data, e, elemIndent))
}

// indentUnit guesses one level of indentation from the first nested line of element e.
func indentUnit(data []byte, e element, elemIndent string) string {
	body := data[e.start:e.end]
	if nl := bytes.IndexByte(body, '\n'); nl >= 0 {
		line := body[nl+1:]
		n := 0
		for n < len(line) && (line[n] == ' ' || line[n] == '\t') {
			n++
		}
		if ind := string(line[:n]); strings.HasPrefix(ind, elemIndent) && len(ind) > len(elemIndent) {
			return ind[len(elemIndent):]
		}
	}
	if strings.Contains(elemIndent, "\t") {
		return "\t"
	}
	return "  "
}

func splice(data []byte, start, end int, repl []byte) []byte {
	out := make([]byte, 0, len(data)-(end-start)+len(repl))
	out = append(out, data[:start]...)
	out = append(out, repl...)
	return append(out, data[end:]...)
}

// removeElement takes element i out together with the separator that joins it to the
// list, so that removing an appended element restores the bytes from before.
func (doc *document) removeElement(i int) []byte {
	els := doc.elements
	switch {
	case i > 0:
		return splice(doc.data, els[i-1].end, els[i].end, nil)
	case len(els) > 1:
		return splice(doc.data, els[0].start, els[1].start, nil)
	default:
		return splice(doc.data, els[0].start, els[0].end, nil)
	}
}

// sameEntry compares an existing element with the wanted entry by meaning.
func sameEntry(raw []byte, entry Entry) (bool, error) {
	want, err := entry.Marshal("", "")
	if err != nil {
		return false, err
	}
	var a, b any
	if err := json.Unmarshal(raw, &a); err != nil {
		return false, err
	}
	if err := json.Unmarshal(want, &b); err != nil {
		return false, err
	}
	return reflect.DeepEqual(a, b), nil
}

// Insert returns data with exactly one metaconceal entry, with the wanted settings,
// after at least one other plugin: appended at the end of the plugins list when there
// was none; an existing one with other settings is rewritten where it stands; extra
// copies, and one in first position (where it would get no prevResult), are removed.
// data must be a .conflist; nothing is returned but an error if it cannot be parsed.
func Insert(data []byte, entry Entry) ([]byte, Action, error) {
	touched := false
	for {
		doc, err := parseConflist(data)
		if err != nil {
			return nil, "", err
		}
		if err := checkVersion(doc.version); err != nil {
			return nil, "", err
		}
		ours := doc.ours()
		switch {
		case len(ours) == len(doc.elements):
			return nil, "", fmt.Errorf("%w: every plugin in the list is %s; there is no main plugin to chain after", ErrNotChainable, PluginType)
		case len(ours) > 1:
			data = doc.removeElement(ours[len(ours)-1])
			touched = true
		case len(ours) == 1 && ours[0] == 0:
			data = doc.removeElement(0)
			touched = true
		case len(ours) == 1:
			e := doc.elements[ours[0]]
			same, err := sameEntry(data[e.start:e.end], entry)
			if err != nil {
				return nil, "", err
			}
			if same {
				if touched {
					return data, Replaced, nil
				}
				return data, Unchanged, nil
			}
			rendered, err := renderEntry(data, e, leadingSpace(data, e.start), entry)
			if err != nil {
				return nil, "", err
			}
			return splice(data, e.start, e.end, rendered), Replaced, nil
		default: // none: append after the last plugin
			last := doc.elements[len(doc.elements)-1]
			ws := leadingSpace(data, last.start)
			rendered, err := renderEntry(data, last, ws, entry)
			if err != nil {
				return nil, "", err
			}
			sep := append([]byte{','}, ws...)
			out := splice(data, last.end, last.end, append(sep, rendered...))
			if touched {
				return out, Replaced, nil
			}
			return out, Added, nil
		}
	}
}

// Remove returns data without any metaconceal entry, and Removed or Absent.
func Remove(data []byte) ([]byte, Action, error) {
	action := Absent
	for {
		doc, err := parseConflist(data)
		if err != nil {
			return nil, "", err
		}
		ours := doc.ours()
		if len(ours) == 0 {
			return data, action, nil
		}
		if len(doc.elements) == 1 {
			return nil, "", fmt.Errorf("%s is the only plugin in the list; refusing to leave an empty list", PluginType)
		}
		data = doc.removeElement(ours[len(ours)-1])
		action = Removed
	}
}

// ConvertConf turns a single-plugin network config (what the runtime loads from a .conf
// or .json file) into a .conflist holding that plugin followed by the entry, the way
// libcni's ConfListFromConf does (the list takes the plugin's name and cniVersion),
// plus ConvertedFromKey naming sourceName.
func ConvertConf(data []byte, sourceName string, entry Entry) ([]byte, error) {
	if err := checkJSON(data); err != nil {
		return nil, err
	}
	conf, err := libcni.NetworkPluginConfFromBytes(data)
	if err != nil {
		return nil, fmt.Errorf("the runtime could not load it as a single-plugin config: %w", err)
	}
	if err := checkVersion(conf.Network.CNIVersion); err != nil {
		return nil, err
	}
	if conf.Network.Type == PluginType {
		return nil, fmt.Errorf("%w: the only plugin is %s; there is no main plugin to chain after", ErrNotChainable, PluginType)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(data, &obj); err != nil {
		return nil, fmt.Errorf("top level is not a JSON object: %w", err)
	}
	if _, ok := obj["plugins"]; ok {
		// The runtime ignores it in a .conf, but the result would be ambiguous to read.
		return nil, fmt.Errorf("%w: single-plugin config also has a \"plugins\" key; rename the file to .conflist if it is a list", ErrNotChainable)
	}
	var plugin bytes.Buffer
	if err := json.Indent(&plugin, bytes.TrimSpace(data), "    ", "  "); err != nil {
		return nil, err
	}
	rendered, err := entry.Marshal("    ", "  ")
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	out.WriteString("{\n")
	if conf.Network.CNIVersion != "" {
		fmt.Fprintf(&out, "  \"cniVersion\": %s,\n", mustQuote(conf.Network.CNIVersion))
	}
	fmt.Fprintf(&out, "  \"name\": %s,\n", mustQuote(conf.Network.Name))
	fmt.Fprintf(&out, "  %s: %s,\n", mustQuote(ConvertedFromKey), mustQuote(sourceName))
	out.WriteString("  \"plugins\": [\n    ")
	out.Write(plugin.Bytes())
	out.WriteString(",\n    ")
	out.Write(rendered)
	out.WriteString("\n  ]\n}\n")
	if _, err := parseConflist(out.Bytes()); err != nil {
		return nil, fmt.Errorf("converted config does not load: %w", err)
	}
	return out.Bytes(), nil
}

func mustQuote(s string) string {
	b, _ := json.Marshal(s) // a string always marshals
	return string(b)
}

// Revert undoes ConvertConf on a conflist that carries ConvertedFromKey and, once the
// metaconceal entry is gone, holds exactly the one original plugin and no key added
// since: it returns the original file name and the plugin object, indented by two
// spaces with a final newline (byte-for-byte the original when it was written that
// way). ok is false when the conflist is not such a conversion.
func Revert(data []byte) (name string, original []byte, ok bool, err error) {
	stripped, _, err := Remove(data)
	if err != nil {
		return "", nil, false, err
	}
	doc, err := parseConflist(stripped)
	if err != nil {
		return "", nil, false, err
	}
	if doc.convertedOf == "" || len(doc.elements) != 1 {
		return "", nil, false, nil
	}
	for _, k := range doc.topKeys {
		switch k {
		case "cniVersion", "name", "plugins", ConvertedFromKey:
		default:
			return "", nil, false, nil // someone added list-level settings: keep the list
		}
	}
	if !validSourceName(doc.convertedOf) {
		return "", nil, false, fmt.Errorf("key %q: value %q is not a .conf or .json file name", ConvertedFromKey, doc.convertedOf)
	}
	e := doc.elements[0]
	var buf bytes.Buffer
	if err := json.Indent(&buf, stripped[e.start:e.end], "", "  "); err != nil {
		return "", nil, false, err
	}
	buf.WriteByte('\n')
	return doc.convertedOf, buf.Bytes(), true, nil
}

func validSourceName(name string) bool {
	if name == "" || strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return false
	}
	return strings.HasSuffix(name, ".conf") || strings.HasSuffix(name, ".json")
}

// readAll is io.ReadAll with a size bound: a CNI config is small, and a huge file in
// the conf dir is not something to load into memory whole.
func readAll(r io.Reader) ([]byte, error) {
	const limit = 4 << 20
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if len(data) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return data, nil
}
