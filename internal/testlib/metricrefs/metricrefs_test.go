package metricrefs

import (
	"slices"
	"strings"
	"testing"
)

func TestParseExpr(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		expr     string
		metrics  map[string][]string
		grouping []string
	}{
		{`max by (instance) (metaconceal_unprotected_pods) > 0`, map[string][]string{"metaconceal_unprotected_pods": nil}, []string{"instance"}},
		{`sum by (instance, namespace, reason) (rate(m_total{reason=~"pod_.*", x!="a,b}"}[5m])) > 1`, map[string][]string{"m_total": {"reason", "x"}}, []string{"instance", "namespace", "reason"}},
		{`histogram_quantile(0.99, sum by (le, kind) (rate(h_bucket{instance=~"$instance"}[$__rate_interval])))`, map[string][]string{"h_bucket": {"instance"}}, []string{"le", "kind"}},
		{`sum(a) without (pod) / on(instance) group_left b`, map[string][]string{"a": nil, "b": nil}, []string{"pod", "instance"}},
		{`count by (version) (metaconceal_build_info) offset 5m`, map[string][]string{"metaconceal_build_info": nil}, []string{"version"}},
	} {
		r, err := ParseExpr("t", tc.expr)
		if err != nil {
			t.Errorf("%s: %v", tc.expr, err)
			continue
		}
		if len(r.Metrics) != len(tc.metrics) {
			t.Errorf("%s: metrics %v, want %v", tc.expr, r.Metrics, tc.metrics)
		}
		for m, ls := range tc.metrics {
			if got, ok := r.Metrics[m]; !ok || !slices.Equal(got, ls) {
				t.Errorf("%s: metric %s labels %v (found %v), want %v", tc.expr, m, got, ok, ls)
			}
		}
		if !slices.Equal(r.Grouping, tc.grouping) {
			t.Errorf("%s: grouping %v, want %v", tc.expr, r.Grouping, tc.grouping)
		}
	}
	for _, bad := range []string{`m{a="x"`, `m{a=x}`, `sum by (a m`, `rate(m[5m)`} {
		if _, err := ParseExpr("t", bad); err == nil {
			t.Errorf("%s: parsed", bad)
		}
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	e := Exported{}
	if err := e.AddExposition("# HELP m x\n# TYPE m counter\nm_total{reason=\"a \\\"b\\\", c\",kind=\"k\"} 1\ng 2\n"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		expr, printed string
		problems      []string
	}{
		{`sum by (instance, reason) (rate(m_total{kind="k"}[5m])) + g`, "reason", nil},
		{`sum by (reasn) (m_total)`, "", []string{"label reasn"}},
		{`m_totl`, "", []string{"metric m_totl is not exported"}},
		{`g{kind="k"}`, "", []string{"metric g has no label kind"}},
		{`sum by (reason) (m_total)`, "namespace", []string{"label namespace"}},
	} {
		r, err := ParseExpr("t", tc.expr)
		if err != nil {
			t.Fatal(err)
		}
		if tc.printed != "" {
			r.Printed = []string{tc.printed}
		}
		got := e.Check([]Ref{r}, "instance", "job")
		if len(got) != len(tc.problems) {
			t.Errorf("%s: problems %q, want %q", tc.expr, got, tc.problems)
			continue
		}
		for i, p := range tc.problems {
			if !strings.Contains(got[i], p) {
				t.Errorf("%s: problem %q, want %q", tc.expr, got[i], p)
			}
		}
	}
}
