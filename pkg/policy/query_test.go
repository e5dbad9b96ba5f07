package policy

import (
	"errors"
	"strings"
	"testing"
)

// Query values are data with a grammar: GCE's own forms pass (canonicalized), free
// text in any value and keys on paths where GCE does not define them are refused.
func TestQueryGrammar(t *testing.T) {
	t.Parallel()
	const v1 = "/computeMetadata/v1/"
	const tok = v1 + "instance/service-accounts/default/token"
	const cp = "https://www.googleapis.com/auth/cloud-platform"
	cases := []struct {
		target string
		rule   Rule   // RuleV1 etc. for allowed
		query  string // canonical query when allowed
	}{
		// GCE's own forms.
		{v1 + "instance/tags?alt=json", RuleV1, "alt=json"},
		{v1 + "instance/tags?ALT=Text", RuleV1, "alt=text"},
		{v1 + "instance/tags?wait_for_change=true&timeout_sec=3600", RuleV1, "wait_for_change=true&timeout_sec=3600"},
		{v1 + "instance/tags?wait_for_change=true&timeout_sec=0", RuleV1, "wait_for_change=true&timeout_sec=0"},
		{v1 + "instance/tags?wait_for_change=true&last_etag=d34db33f", RuleV1, "wait_for_change=true&last_etag=d34db33f"},
		{v1 + "instance/tags?wait_for_change=true&last_etag=0123456789ABCDEF", RuleV1, "wait_for_change=true&last_etag=0123456789ABCDEF"},
		{v1 + "?wait_for_change=true", RuleV1, "wait_for_change=true"},
		{v1 + "instance/service-accounts/default/?recursive=true", RuleServiceAccountRecursive, "recursive=true"},
		// scopes on tokens, as Google's auth libraries send them (raw or encoded).
		{tok + "?scopes=" + cp, RuleV1, "scopes=" + cp},
		{tok + "?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform%2Chttps%3A%2F%2Fwww.googleapis.com%2Fauth%2Fuserinfo.email", RuleV1, "scopes=" + cp + ",https://www.googleapis.com/auth/userinfo.email"},
		{tok + "?scopes=" + cp + ",https://www.googleapis.com/auth/devstorage.read_only&alt=json", RuleV1, "alt=json&scopes=" + cp + ",https://www.googleapis.com/auth/devstorage.read_only"},
		{v1 + "instance/service-accounts/sa@p.iam.gserviceaccount.com/token?scopes=" + cp, RuleV1, "scopes=" + cp},

		// Free text in values.
		{v1 + "instance/attributes/?last_etag=recursive", RuleBadQueryValue, ""},
		{v1 + "instance/attributes/?wait_for_change=true&last_etag=recursive", RuleBadQueryValue, ""},
		{v1 + "instance/tags?last_etag=d34db33g", RuleBadQueryValue, ""},
		{v1 + "instance/tags?last_etag=abc-def", RuleBadQueryValue, ""},
		{v1 + "instance/tags?last_etag=" + strings.Repeat("a", 65), RuleBadQueryValue, ""},
		{v1 + "instance/tags?timeout_sec=1e3", RuleBadQueryValue, ""},
		{v1 + "instance/tags?timeout_sec=", RuleBadQueryValue, ""},
		{v1 + "instance/tags?timeout_sec=99999", RuleBadQueryValue, ""},
		{v1 + "instance/tags?alt=recursive", RuleBadQueryValue, ""},
		{v1 + "instance/tags?wait_for_change=recursive", RuleBadQueryValue, ""},
		{v1 + "instance/tags?wait_for_change=1", RuleBadQueryValue, ""},
		{tok + "?scopes=recursive", RuleBadQueryValue, ""},
		{tok + "?scopes=", RuleBadQueryValue, ""},
		{tok + "?scopes=" + cp + ",", RuleBadQueryValue, ""},
		{tok + "?scopes=http://www.googleapis.com/auth/cloud-platform", RuleBadQueryValue, ""},
		{tok + "?scopes=https://www.googleapis.com/auth/", RuleBadQueryValue, ""},
		{tok + "?scopes=https://www.googleapis.com/auth/../../computeMetadata", RuleBadQueryValue, ""},
		{tok + "?scopes=https://www.googleapis.com/auth/x%20recursive", RuleBadQueryValue, ""},
		{tok + "?scopes=https://www.googleapis.com/auth/x+recursive", RuleBadQueryValue, ""},
		{tok + "?scopes=https://evil.example/auth/x", RuleBadQueryValue, ""},
		{tok + "?scopes=" + strings.Repeat(cp+",", 64) + cp, RuleBadQueryValue, ""},

		// Keys where GCE does not define them.
		{v1 + "instance/service-accounts/default/email?scopes=" + cp, RuleQueryKeyPath, ""},
		{v1 + "instance/attributes/?scopes=" + cp, RuleQueryKeyPath, ""},
		{v1 + "instance/service-accounts/default/token/x?scopes=" + cp, RuleQueryKeyPath, ""},
		{v1 + "instance/tags?audience=x", RuleQueryKeyPath, ""},
		{v1 + "instance/tags?format=full", RuleQueryKeyPath, ""},
		{v1 + "instance/tags?licenses=TRUE", RuleQueryKeyPath, ""},
		{"/?alt=text", RuleQueryKeyPath, ""},
		{"/computeMetadata/?wait_for_change=true", RuleQueryKeyPath, ""},
		{"/?recursive=true", RuleRecursive, ""},
	}
	p := mustPolicy(t, Config{})
	for _, tc := range cases {
		d := p.Evaluate("GET", tc.target, false)
		if d.Rule != tc.rule {
			t.Errorf("%s: %s/%s, want rule %s", tc.target, d.Verdict, d.Rule, tc.rule)
			continue
		}
		if d.Verdict == Allow && d.RawQuery != tc.query {
			t.Errorf("%s: canonical query %q, want %q", tc.target, d.RawQuery, tc.query)
		}
	}
}

// Identity's keys have a grammar too (only exposed pods reach the endpoint).
func TestIdentityQueryGrammar(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{}).Exposed()
	const id = "/computeMetadata/v1/instance/service-accounts/default/identity"
	for target, want := range map[string]string{
		id + "?audience=https://example.com/x&format=FULL&licenses=true": "audience=https%3A%2F%2Fexample.com%2Fx&format=full&licenses=TRUE",
		id + "?audience=sts.googleapis.com":                              "audience=sts.googleapis.com",
	} {
		d := p.Evaluate("GET", target, false)
		if d.Verdict != Allow || d.RawQuery != want {
			t.Errorf("%s: %s/%s %q, want allow %q", target, d.Verdict, d.Rule, d.RawQuery, want)
		}
	}
	for _, target := range []string{
		id + "?audience=a+b", id + "?audience=", id + "?format=recursive", id + "?licenses=yes",
		id + "?audience=" + strings.Repeat("a", 513),
	} {
		if d := p.Evaluate("GET", target, false); d.Verdict != Deny || d.Rule != RuleBadQueryValue {
			t.Errorf("%s: %s/%s, want deny/bad-query-value", target, d.Verdict, d.Rule)
		}
	}
}

// FilterListing fails closed: only GCE's JSON shape is filtered, and what it returns
// names no concealed endpoint.
func TestFilterListingFailsClosed(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{Recursive: RecursiveFilter, File: File{ConcealPaths: []string{"instance/attributes/secret"}}})
	const dir = "/computeMetadata/v1/instance/"
	for name, body := range map[string]string{
		"flat map of paths":      `{"instance/attributes/kube-env":"KUBELET_KEY"}`,
		"flat map of other path": `{"attributes/cluster-name":"c"}`,
		"empty key":              `{"":"x"}`,
		"control in key":         `{"a\u0001":"x"}`,
		"null":                   `null`,
		"null value":             `{"a":null}`,
		"not json":               `kube-env=KUBELET_KEY`,
		"two values":             `{} {}`,
		"deep":                   strings.Repeat(`{"a":`, 40) + `1` + strings.Repeat(`}`, 40),
		"top string naming":      `"instance/attributes/kube-env"`,
	} {
		if out, err := p.FilterListing(dir, []byte(body)); err == nil || !errors.Is(err, ErrListingShape) {
			t.Errorf("%s: FilterListing(%s) = %s, %v; want ErrListingShape", name, body, out, err)
		}
	}
	// Entries whose value names a concealed endpoint are removed with it, as are
	// array strings naming one; the rest stays.
	out, err := p.FilterListing(dir, []byte(`{"attributes":{"configure-sh":"curl .../instance/attributes/kube-env","note":"uses KUBE_ENV","other":"o","secret":"s"},`+
		`"serviceAccounts":{"default":{"email":"e","identity":"JWT","aliases":["default","instance/service-accounts/default/identity"]}},"tags":["a","kubeEnv"]}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{"configure-sh", "KUBE_ENV", "JWT", "identity", "kubeEnv", `"s"`} {
		if strings.Contains(string(out), gone) {
			t.Errorf("filtered listing %s still holds %s", out, gone)
		}
	}
	for _, kept := range []string{`"other":"o"`, `"email":"e"`, `"aliases":["default"]`, `"tags":["a"]`} {
		if !strings.Contains(string(out), kept) {
			t.Errorf("filtered listing %s lost %s", out, kept)
		}
	}
}
