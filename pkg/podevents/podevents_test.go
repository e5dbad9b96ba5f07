package podevents

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/metaconceal/metaconceal/pkg/policy"
)

func TestBlockedEvent(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name       string
		d          policy.Decision
		ok         bool
		reason     string
		mustHave   []string
		mustNotHas []string
	}{
		{"allowed", policy.Decision{Verdict: policy.Allow, Rule: policy.RuleV1, Path: "/computeMetadata/v1/project/project-id"}, false, "", nil, nil},
		{"concealed", policy.Decision{Verdict: policy.Conceal, Rule: policy.RuleKubeEnv, Path: "/computeMetadata/v1/instance/attributes/kube-env"},
			true, ReasonConcealed, []string{`"/computeMetadata/v1/instance/attributes/kube-env"`, policy.RuleKubeEnv.String(), "concealed"}, nil},
		{"denied", policy.Decision{Verdict: policy.Deny, Rule: policy.RuleLegacyAPI, Path: "/0.1/meta-data/"},
			true, ReasonDenied, []string{`"/0.1/meta-data/"`, policy.RuleLegacyAPI.String(), policy.RuleLegacyAPI.Description()}, nil},
		{"control characters quoted", policy.Decision{Verdict: policy.Deny, Rule: policy.RuleLegacyAPI, Path: "/a\nb\x00c"},
			true, ReasonDenied, []string{`"/a\nb\x00c"`}, []string{"\n", "\x00"}},
		{"no path", policy.Decision{Verdict: policy.Deny, Rule: policy.RuleLegacyAPI}, true, ReasonDenied, []string{`""`}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			reason, msg, ok := BlockedEvent(c.d)
			if ok != c.ok || reason != c.reason {
				t.Fatalf("BlockedEvent = %q, %q, %v; want reason %q, ok %v", reason, msg, ok, c.reason, c.ok)
			}
			for _, s := range c.mustHave {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q lacks %q", msg, s)
				}
			}
			for _, s := range c.mustNotHas {
				if strings.Contains(msg, s) {
					t.Errorf("message %q holds %q", msg, s)
				}
			}
		})
	}
}

func TestQuotePathBounded(t *testing.T) {
	t.Parallel()
	long := "/" + strings.Repeat("é", 400) // multi-byte runes across the cut
	q := quotePath(long)
	if !strings.HasSuffix(q, "...") || len(q) > 4*maxPathInMessage+8 || !utf8.ValidString(q) {
		t.Errorf("quotePath of %d bytes = %d bytes %q...: want cut, valid UTF-8, marked", len(long), len(q), q[:20])
	}
}

func FuzzQuotePath(f *testing.F) {
	for _, s := range []string{"", "/computeMetadata/v1/", "/a\nb", strings.Repeat("\xff", 300)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		q := quotePath(p)
		if strings.ContainsAny(q, "\n\r\x00") || !utf8.ValidString(q) {
			t.Fatalf("quotePath(%q) = %q: control characters or invalid UTF-8 reach the API", p, q)
		}
		if len(q) > 4*maxPathInMessage+8 {
			t.Fatalf("quotePath(%d bytes) = %d bytes: unbounded", len(p), len(q))
		}
	})
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	if _, err := New(Config{Component: "x"}); err == nil {
		t.Error("no client: want an error")
	}
}
