// Package metricrefs finds the metric and label names that the chart's alerts
// (files/alerts.yaml) and dashboard (files/dashboard.json) name, and checks them
// against what the programs really export (their /metrics, in the Prometheus text
// format). A small PromQL scanner, enough for these files: metric names, the labels of
// their selectors, of by/without/on/ignoring clauses, and the labels that annotations
// ($labels.x) and legends ({{x}}) print.
package metricrefs

import (
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// ClusterOnly are the series a simulated node cannot make the programs export (the
// unit test, charts/metrics_test.go, takes them as given) and the cluster e2e checks
// on a real node (scenario helm-install): the readiness gate's gauge needs the
// Kubernetes API (--readiness-gate), the self-test's needs a concealed pod to probe
// from. Metric name -> the labels the alerts and the dashboard may use on it.
var ClusterOnly = map[string][]string{
	"metaconceal_readiness_gate_open": nil,
	"metaconceal_guard_effective":     {"pod"},
}

// Ref is what one expression (an alert's, a panel's) names.
type Ref struct {
	Source   string              // "alert MetaconcealUnprotectedPods", "panel Requests by verdict"
	Expr     string              // the expression
	Metrics  map[string][]string // metric name -> labels of its selectors
	Grouping []string            // labels of by/without/on/ignoring/group_* clauses
	Printed  []string            // labels printed by annotations or legends
}

// keywords are PromQL words that are not metrics: operators, modifiers and the
// aggregations (which may be followed by a by/without clause before their parenthesis).
var keywords = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "count": true, "stddev": true, "stdvar": true,
	"topk": true, "bottomk": true, "quantile": true, "count_values": true, "group": true,
	"limitk": true, "limit_ratio": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "inf": true, "nan": true,
}

var groupingWords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}
func isIdent(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' }

// ParseExpr scans one PromQL expression.
func ParseExpr(source, expr string) (Ref, error) {
	r := Ref{Source: source, Expr: expr, Metrics: map[string][]string{}}
	s := expr
	i := 0
	skipSpace := func() {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
			i++
		}
	}
	ident := func() string {
		start := i
		for i < len(s) && isIdent(s[i]) {
			i++
		}
		return s[start:i]
	}
	skipString := func() error {
		q := s[i]
		i++
		for i < len(s) && s[i] != q {
			if s[i] == '\\' && q != '`' {
				i++
			}
			i++
		}
		if i >= len(s) {
			return fmt.Errorf("%s: unterminated string in %q", source, expr)
		}
		i++
		return nil
	}
	// matchers reads {l op "v", ...} and returns the label names.
	matchers := func() ([]string, error) {
		i++ // {
		var labels []string
		for {
			skipSpace()
			if i >= len(s) {
				return nil, fmt.Errorf("%s: unterminated selector in %q", source, expr)
			}
			if s[i] == '}' {
				i++
				return labels, nil
			}
			if s[i] == ',' {
				i++
				continue
			}
			if !isIdentStart(s[i]) {
				return nil, fmt.Errorf("%s: bad selector at %q", source, s[i:])
			}
			labels = append(labels, ident())
			skipSpace()
			for i < len(s) && strings.IndexByte("=!~", s[i]) >= 0 {
				i++
			}
			skipSpace()
			if i >= len(s) || (s[i] != '"' && s[i] != '\'' && s[i] != '`') {
				return nil, fmt.Errorf("%s: matcher without a string value in %q", source, expr)
			}
			if err := skipString(); err != nil {
				return nil, err
			}
		}
	}
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '"' || c == '\'' || c == '`':
			if err := skipString(); err != nil {
				return r, err
			}
		case c == '[': // a range or subquery: durations, $__rate_interval
			end := strings.IndexByte(s[i:], ']')
			if end < 0 {
				return r, fmt.Errorf("%s: unterminated range in %q", source, expr)
			}
			i += end + 1
		case c == '{': // a selector without a metric name
			if _, err := matchers(); err != nil {
				return r, err
			}
		case c >= '0' && c <= '9' || c == '.':
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') {
				i++
			}
		case isIdentStart(c):
			word := ident()
			skipSpace()
			next := byte(0)
			if i < len(s) {
				next = s[i]
			}
			switch {
			case groupingWords[word] && next == '(':
				end := strings.IndexByte(s[i:], ')')
				if end < 0 {
					return r, fmt.Errorf("%s: unterminated %s clause in %q", source, word, expr)
				}
				for l := range strings.SplitSeq(s[i+1:i+end], ",") {
					if l = strings.TrimSpace(l); l != "" {
						r.Grouping = append(r.Grouping, l)
					}
				}
				i += end + 1
			case keywords[word]:
			case next == '(': // a function or an aggregation
			default:
				labels := r.Metrics[word]
				if next == '{' {
					ls, err := matchers()
					if err != nil {
						return r, err
					}
					labels = append(labels, ls...)
				}
				r.Metrics[word] = labels
			}
		default:
			i++
		}
	}
	return r, nil
}

var (
	annotationLabel = regexp.MustCompile(`\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)`)
	legendLabel     = regexp.MustCompile(`\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
	labelValues     = regexp.MustCompile(`^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$`)
)

// FromAlerts reads a Prometheus rules file.
func FromAlerts(data []byte) ([]Ref, error) {
	var f struct {
		Groups []struct {
			Name     string `json:"name"`
			Interval string `json:"interval"`
			Rules    []struct {
				Alert         string            `json:"alert"`
				Record        string            `json:"record"`
				Expr          string            `json:"expr"`
				For           string            `json:"for"`
				KeepFiringFor string            `json:"keep_firing_for"`
				Labels        map[string]string `json:"labels"`
				Annotations   map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("rules file: %w", err)
	}
	var refs []Ref
	for _, g := range f.Groups {
		for _, rule := range g.Rules {
			r, err := ParseExpr("alert "+rule.Alert+rule.Record, rule.Expr)
			if err != nil {
				return nil, err
			}
			for _, texts := range []map[string]string{rule.Labels, rule.Annotations} {
				for _, text := range texts {
					for _, m := range annotationLabel.FindAllStringSubmatch(text, -1) {
						r.Printed = append(r.Printed, m[1])
					}
				}
			}
			refs = append(refs, r)
		}
	}
	return refs, nil
}

// FromDashboard reads a Grafana dashboard: every panel target's expression and legend,
// and the label_values(metric, label) queries of its variables.
func FromDashboard(data []byte) ([]Ref, error) {
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct {
				Expr         string
				LegendFormat string `json:"legendFormat"`
			}
		}
		Templating struct {
			List []struct {
				Name  string
				Type  string
				Query json.RawMessage
			}
		}
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	var refs []Ref
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			return nil, fmt.Errorf("dashboard: panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			r, err := ParseExpr("panel "+p.Title, tg.Expr)
			if err != nil {
				return nil, err
			}
			for _, m := range legendLabel.FindAllStringSubmatch(tg.LegendFormat, -1) {
				r.Printed = append(r.Printed, m[1])
			}
			refs = append(refs, r)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct{ Query string }
		if err := json.Unmarshal(v.Query, &q); err != nil {
			return nil, fmt.Errorf("dashboard: variable %s: %w", v.Name, err)
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil {
			return nil, fmt.Errorf("dashboard: variable %s: query %q is not label_values(metric, label)", v.Name, q.Query)
		}
		refs = append(refs, Ref{Source: "variable " + v.Name, Expr: q.Query, Metrics: map[string][]string{m[1]: {m[2]}}})
	}
	return refs, nil
}

// Exported is what programs export: series name -> its label names.
type Exported map[string]map[string]bool

// AddExposition adds the series of a /metrics body (Prometheus text format).
func (e Exported) AddExposition(body string) error {
	for line := range strings.SplitSeq(body, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		end := strings.IndexAny(line, "{ ")
		if end <= 0 {
			return fmt.Errorf("exposition line %q", line)
		}
		name := line[:end]
		if e[name] == nil {
			e[name] = map[string]bool{}
		}
		if line[end] != '{' {
			continue
		}
		rest := line[end+1:]
		for {
			rest = strings.TrimLeft(rest, ", ")
			if rest == "" || rest[0] == '}' {
				break
			}
			eq := strings.IndexByte(rest, '=')
			if eq <= 0 || len(rest) < eq+2 || rest[eq+1] != '"' {
				return fmt.Errorf("exposition line %q: bad label", line)
			}
			e[name][rest[:eq]] = true
			j := eq + 2
			for j < len(rest) && rest[j] != '"' {
				if rest[j] == '\\' {
					j++
				}
				j++
			}
			if j >= len(rest) {
				return fmt.Errorf("exposition line %q: unterminated value", line)
			}
			rest = rest[j+1:]
		}
	}
	return nil
}

// Check returns one problem per metric or label that refs name and nobody exports.
// targetLabels are the labels Prometheus itself puts on every scraped series (instance,
// job): they exist whatever the programs export.
func (e Exported) Check(refs []Ref, targetLabels ...string) []string {
	target := map[string]bool{}
	for _, l := range targetLabels {
		target[l] = true
	}
	var problems []string
	for _, r := range refs {
		if len(r.Metrics) == 0 {
			problems = append(problems, fmt.Sprintf("%s: names no metric: %q", r.Source, r.Expr))
		}
		all := map[string]bool{}
		var names []string
		for m := range r.Metrics {
			names = append(names, m)
		}
		sort.Strings(names)
		for _, m := range names {
			labels, ok := e[m]
			if !ok {
				problems = append(problems, fmt.Sprintf("%s: metric %s is not exported", r.Source, m))
				continue
			}
			for l := range labels {
				all[l] = true
			}
			for _, l := range r.Metrics[m] {
				if !labels[l] && !target[l] {
					problems = append(problems, fmt.Sprintf("%s: metric %s has no label %s", r.Source, m, l))
				}
			}
		}
		for _, l := range append(append([]string{}, r.Grouping...), r.Printed...) {
			if !all[l] && !target[l] {
				problems = append(problems, fmt.Sprintf("%s: label %s is on none of %v", r.Source, l, names))
			}
		}
	}
	return problems
}
