package policy

import (
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/k8scheck"
)

func mustPolicy(t testing.TB, cfg Config) *Policy {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return p
}

// targetOf turns a URL as Kubernetes' check writes it into the request target an HTTP
// client sends for it.
func targetOf(t *testing.T, rawURL string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatalf("parse %q: %v", rawURL, err)
	}
	target := u.RequestURI()
	if u.Path == "" && u.RawPath == "" && u.Opaque == "" {
		target = "/" + strings.TrimPrefix(target, "/")
	}
	return target
}

// Kubernetes' metadata-concealment e2e check (internal/testlib/k8scheck): every
// endpoint of its three lists, and its X-Forwarded-For rule.
func TestKubernetesConcealmentCheck(t *testing.T) {
	t.Parallel()
	for _, mode := range []RecursiveMode{RecursiveDeny, RecursiveFilter} {
		p := mustPolicy(t, Config{Recursive: mode})
		for _, u := range k8scheck.Success {
			target := targetOf(t, u)
			if d := p.Evaluate("GET", target, false); d.Verdict != Allow {
				t.Errorf("mode %s: success endpoint %s (target %q): got %s/%s, want allow", mode, u, target, d.Verdict, d.Rule)
			}
			// The check's X-Forwarded-For rule: every success endpoint fails with it.
			if d := p.Evaluate("GET", target, true); d.Verdict != Deny || d.Rule != RuleXForwardedFor {
				t.Errorf("mode %s: success endpoint %s with X-Forwarded-For: got %s/%s, want deny/x-forwarded-for", mode, u, d.Verdict, d.Rule)
			}
		}
		for _, u := range k8scheck.NoKubeEnv {
			if d := p.Evaluate("GET", targetOf(t, u), false); d.Verdict == Allow {
				t.Errorf("mode %s: no-kube-env endpoint %s: got allow/%s, want 403", mode, u, d.Rule)
			}
		}
		for _, u := range k8scheck.Failure {
			d := p.Evaluate("GET", targetOf(t, u), false)
			if mode == RecursiveFilter && d.Verdict == Allow && d.FilterListing {
				continue // filter mode allows recursive listings and strips kube-env from them
			}
			if d.Verdict == Allow {
				t.Errorf("mode %s: failure endpoint %s: got allow/%s, want 403", mode, u, d.Rule)
			}
		}
	}
}

func TestEvaluate(t *testing.T) {
	t.Parallel()
	type want struct {
		verdict Verdict
		rule    Rule
		path    string // canonical path when allowed
		query   string // canonical query when allowed
	}
	allow := func(rule Rule, path, query string) want { return want{Allow, rule, path, query} }
	conceal := func(rule Rule) want { return want{verdict: Conceal, rule: rule} }
	deny := func(rule Rule) want { return want{verdict: Deny, rule: rule} }
	const v1 = "/computeMetadata/v1/"
	cases := []struct {
		name   string
		method string
		target string
		xff    bool
		mode   RecursiveMode
		want   want
	}{
		// Allowed: discovery, the v1 tree, service account tokens, email, scopes, aliases.
		{name: "root", target: "/", want: allow(RuleDiscovery, "/", "")},
		{name: "computeMetadata dir", target: "/computeMetadata/", want: allow(RuleDiscovery, "/computeMetadata/", "")},
		{name: "v1 without slash keeps it for the 301", target: "/computeMetadata/v1", want: allow(RuleV1, "/computeMetadata/v1", "")},
		{name: "project id", target: v1 + "project/project-id", want: allow(RuleV1, v1+"project/project-id", "")},
		{name: "head", method: "HEAD", target: v1 + "project/project-id", want: allow(RuleV1, v1+"project/project-id", "")},
		{name: "token", target: v1 + "instance/service-accounts/default/token", want: allow(RuleV1, v1+"instance/service-accounts/default/token", "")},
		{name: "email", target: v1 + "instance/service-accounts/default/email", want: allow(RuleV1, v1+"instance/service-accounts/default/email", "")},
		{name: "scopes", target: v1 + "instance/service-accounts/default/scopes", want: allow(RuleV1, v1+"instance/service-accounts/default/scopes", "")},
		{name: "aliases", target: v1 + "instance/service-accounts/default/aliases", want: allow(RuleV1, v1+"instance/service-accounts/default/aliases", "")},
		{name: "named account token", target: v1 + "instance/service-accounts/sa@p.iam.gserviceaccount.com/token", want: allow(RuleV1, v1+"instance/service-accounts/sa@p.iam.gserviceaccount.com/token", "")},
		{name: "attributes listing shows names only", target: v1 + "instance/attributes/", want: allow(RuleV1, v1+"instance/attributes/", "")},
		{name: "other attribute", target: v1 + "instance/attributes/cluster-name", want: allow(RuleV1, v1+"instance/attributes/cluster-name", "")},
		{name: "attribute prefixed kube-env is another key", target: v1 + "instance/attributes/kube-env-not", want: allow(RuleV1, v1+"instance/attributes/kube-env-not", "")},
		{name: "sa recursive without slash", target: v1 + "instance/service-accounts/default?recursive=true", want: allow(RuleServiceAccountRecursive, v1+"instance/service-accounts/default", "recursive=true")},
		{name: "query canonicalized", target: v1 + "instance/tags?Timeout_Sec=030&WAIT_FOR_CHANGE=TRUE&last_etag=d34db33f", want: allow(RuleV1, v1+"instance/tags", "wait_for_change=true&last_etag=d34db33f&timeout_sec=30")},
		{name: "empty query parts dropped", target: v1 + "instance/tags?&alt=text&", want: allow(RuleV1, v1+"instance/tags", "alt=text")},
		{name: "empty last_etag", target: v1 + "instance/tags?wait_for_change=true&last_etag=", want: allow(RuleV1, v1+"instance/tags", "wait_for_change=true&last_etag=")},
		{name: "dot segments resolved", target: "/computeMetadata/v1/instance/../project/./project-id", want: allow(RuleV1, v1+"project/project-id", "")},
		{name: "double slash resolved", target: "//computeMetadata//v1///project/project-id", want: allow(RuleV1, v1+"project/project-id", "")},
		{name: "encoded slash decoded", target: "/computeMetadata/v1/project%2Fproject-id", want: allow(RuleV1, v1+"project/project-id", "")},
		{name: "trailing dot keeps dir form", target: "/computeMetadata/v1/instance/.", want: allow(RuleV1, v1+"instance/", "")},

		// Concealed: kube-env in every spelling the upstream could resolve to it.
		{name: "kube-env", target: v1 + "instance/attributes/kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env head", method: "HEAD", target: v1 + "instance/attributes/kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env trailing slash", target: v1 + "instance/attributes/kube-env/", want: conceal(RuleKubeEnv)},
		{name: "kube-env upper case", target: v1 + "instance/attributes/KUBE-ENV", want: conceal(RuleKubeEnv)},
		{name: "kube-env mixed case dirs", target: v1 + "Instance/ATTRIBUTES/Kube-Env", want: conceal(RuleKubeEnv)},
		{name: "kube-env encoded k", target: v1 + "instance/attributes/%6bube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env encoded dash", target: v1 + "instance/attributes/kube%2Denv", want: conceal(RuleKubeEnv)},
		{name: "kube-env fully encoded", target: v1 + "instance/attributes/%6B%75%62%65%2D%65%6E%76", want: conceal(RuleKubeEnv)},
		{name: "kube-env encoded slash", target: v1 + "instance/attributes%2Fkube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env encoded dot segments", target: v1 + "instance/attributes/%2e%2e/attributes/kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env encoded dot slash", target: v1 + "instance/attributes/%2e%2fkube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env double slash", target: v1 + "instance//attributes//kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env single dot", target: v1 + "instance/attributes/./kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env via v1 dot dot", target: "/computeMetadata/v1/../v1/instance/attributes/kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env with query", target: v1 + "instance/attributes/kube-env?alt=text", want: conceal(RuleKubeEnv)},
		{name: "kube-env long poll", target: v1 + "instance/attributes/kube-env?wait_for_change=true", want: conceal(RuleKubeEnv)},
		{name: "kube-env in project attributes", target: v1 + "project/attributes/kube-env", want: conceal(RuleKubeEnv)},
		{name: "kube-env below", target: v1 + "instance/attributes/kube-env/x", want: conceal(RuleKubeEnv)},
		{name: "identity", target: v1 + "instance/service-accounts/default/identity?audience=x", want: conceal(RuleIdentity)},
		{name: "identity named account", target: v1 + "instance/service-accounts/sa@p.iam.gserviceaccount.com/identity", want: conceal(RuleIdentity)},
		{name: "identity upper case", target: v1 + "instance/service-accounts/default/IDENTITY", want: conceal(RuleIdentity)},
		{name: "identity encoded", target: v1 + "instance/service-accounts/default/%69dentity", want: conceal(RuleIdentity)},
		{name: "identity trailing slash", target: v1 + "instance/service-accounts/default/identity/", want: conceal(RuleIdentity)},
		{name: "identity dot segments", target: v1 + "instance/service-accounts/x/../default/identity", want: conceal(RuleIdentity)},
		{name: "identity recursive", target: v1 + "instance/service-accounts/default/identity?recursive=true", want: conceal(RuleIdentity)},

		// Denied.
		{name: "post", method: "POST", target: v1 + "project/project-id", want: deny(RuleMethod)},
		{name: "put", method: "PUT", target: v1 + "project/project-id", want: deny(RuleMethod)},
		{name: "options", method: "OPTIONS", target: "*", want: deny(RuleMethod)},
		{name: "lower-case get", method: "get", target: v1 + "project/project-id", want: deny(RuleMethod)},
		{name: "x-forwarded-for", target: v1 + "project/project-id", xff: true, want: deny(RuleXForwardedFor)},
		{name: "absolute form", target: "http://169.254.169.254/computeMetadata/v1/instance/attributes/kube-env", want: deny(RuleRequestTarget)},
		{name: "absolute form allowed path", target: "http://metadata.google.internal/computeMetadata/v1/project/project-id", want: deny(RuleRequestTarget)},
		{name: "asterisk form", target: "*", want: deny(RuleRequestTarget)},
		{name: "authority form", target: "metadata.google.internal:80", want: deny(RuleRequestTarget)},
		{name: "opaque", target: "http:%2F%2Fx/computeMetadata/v1/", want: deny(RuleRequestTarget)},
		{name: "empty target", target: "", want: deny(RuleRequestTarget)},
		{name: "backslash", target: v1 + "instance\\attributes\\kube-env", want: deny(RuleBadCharacter)},
		{name: "encoded backslash", target: v1 + "instance%5Cattributes%5Ckube-env", want: deny(RuleBadEscape)},
		{name: "tab", target: v1 + "instance/attributes/kube-env\t", want: deny(RuleBadCharacter)},
		{name: "nul", target: v1 + "instance/attributes/kube-env\x00", want: deny(RuleBadCharacter)},
		{name: "encoded nul", target: v1 + "instance/attributes/kube-env%00", want: deny(RuleBadEscape)},
		{name: "encoded newline", target: v1 + "project/project-id%0a", want: deny(RuleBadEscape)},
		{name: "non ascii", target: v1 + "instance/attributes/kube-\xe2\x80\x91env", want: deny(RuleBadCharacter)},
		{name: "encoded non ascii", target: v1 + "instance/attributes/kube%E2%80%91env", want: deny(RuleBadEscape)},
		{name: "path semicolon", target: v1 + "instance/attributes/kube-env;x", want: deny(RuleBadCharacter)},
		{name: "fragment", target: v1 + "project/project-id#x", want: deny(RuleBadCharacter)},
		{name: "double encoded slash", target: v1 + "instance/attributes%252Fkube-env", want: deny(RuleBadEscape)},
		{name: "double encoded k", target: v1 + "instance/attributes/%256bube-env", want: deny(RuleBadEscape)},
		{name: "encoded question mark", target: v1 + "instance/attributes/kube-env%3F", want: deny(RuleBadEscape)},
		{name: "bad escape", target: v1 + "project/project-id%zz", want: deny(RuleBadEscape)},
		{name: "truncated escape", target: v1 + "project/project-id%2", want: deny(RuleBadEscape)},
		{name: "dot dot above root", target: "/../computeMetadata/v1/project/project-id", want: deny(RuleBadPath)},
		{name: "encoded dot dot above root", target: "/%2e%2e/computeMetadata/v1/", want: deny(RuleBadPath)},
		{name: "legacy 0.1", target: "/0.1/meta-data/attributes/kube-env", want: deny(RuleLegacyAPI)},
		{name: "legacy 0.1 root", target: "/0.1/", want: deny(RuleLegacyAPI)},
		{name: "legacy v1beta1", target: "/computeMetadata/v1beta1/instance/attributes/kube-env", want: deny(RuleLegacyAPI)},
		{name: "legacy v1beta1 upper", target: "/computeMetadata/V1BETA1/", want: deny(RuleLegacyAPI)},
		{name: "legacy v1beta1 via dots", target: "/computeMetadata/v1/../v1beta1/instance/", want: deny(RuleLegacyAPI)},
		{name: "legacy encoded", target: "/computeMetadata/v1beta%31/", want: deny(RuleLegacyAPI)},
		{name: "unknown version v2", target: "/computeMetadata/v2/", want: deny(RuleUnknownAPIVersion)},
		{name: "upper V1", target: "/computeMetadata/V1/instance/attributes/kube-env", want: deny(RuleUnknownAPIVersion)},
		{name: "lower computemetadata", target: "/computemetadata/v1/project/project-id", want: deny(RuleUnknownAPIVersion)},
		{name: "0.2", target: "/0.2/", want: deny(RuleUnknownAPIVersion)},
		{name: "other root path", target: "/favicon.ico", want: deny(RuleUnknownAPIVersion)},
		{name: "semicolon in query", target: v1 + "project/project-id?alt=text;recursive=true", want: deny(RuleSemicolonInQuery)},
		{name: "semicolon alone", target: v1 + "project/project-id?;", want: deny(RuleSemicolonInQuery)},
		{name: "unknown key", target: v1 + "project/project-id?foo=bar", want: deny(RuleUnknownQueryKey)},
		{name: "unknown valueless key", target: v1 + "project/project-id?unknown", want: deny(RuleUnknownQueryKey)},
		{name: "audience outside identity", target: v1 + "instance/service-accounts/default/token?audience=x", want: deny(RuleQueryKeyPath)},
		{name: "encoded equals in key", target: v1 + "instance/?recursive%3Dtrue", want: deny(RuleUnknownQueryKey)},
		{name: "backspaced key", target: v1 + "instance/?re%08ecursive=true", want: deny(RuleBadEscape)},
		{name: "duplicate key", target: v1 + "instance/tags?alt=text&alt=json", want: deny(RuleDuplicateQueryKey)},
		{name: "duplicate key other case", target: v1 + "instance/tags?alt=text&ALT=text", want: deny(RuleDuplicateQueryKey)},
		{name: "duplicate recursive under sa", target: v1 + "instance/service-accounts/default/?recursive=false&recursive=true", want: deny(RuleDuplicateQueryKey)},
		{name: "bad alt", target: v1 + "instance/tags?alt=xml", want: deny(RuleBadQueryValue)},
		{name: "bad bool", target: v1 + "instance/tags?wait_for_change=yes", want: deny(RuleBadQueryValue)},
		{name: "timeout too long", target: v1 + "instance/tags?wait_for_change=true&timeout_sec=3601", want: deny(RuleBadQueryValue)},
		{name: "timeout negative", target: v1 + "instance/tags?timeout_sec=-1", want: deny(RuleBadQueryValue)},
		{name: "timeout plus", target: v1 + "instance/tags?timeout_sec=%2B5", want: deny(RuleBadQueryValue)},
		{name: "etag with space", target: v1 + "instance/tags?last_etag=a+b", want: deny(RuleBadQueryValue)},
		{name: "double encoded value", target: v1 + "instance/tags?alt=%2574ext", want: deny(RuleBadEscape)},
		{name: "raw control in query", target: v1 + "instance/tags?alt=te\x01xt", want: deny(RuleBadCharacter)},

		// recursive, deny mode: only under service-accounts/<account>/.
		{name: "recursive v1", target: v1 + "?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive instance", target: v1 + "instance/?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive attributes", target: v1 + "instance/attributes/?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive project", target: v1 + "project/?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive false still denied", target: v1 + "instance/?recursive=false", want: deny(RuleRecursive)},
		{name: "recursive valueless", target: v1 + "instance/?recursive", want: deny(RuleBadQueryValue)},
		{name: "recursive capitalized", target: v1 + "instance/?Recursive=true", want: deny(RuleRecursive)},
		{name: "recursive upper", target: v1 + "instance/?RECURSIVE=TRUE", want: deny(RuleRecursive)},
		{name: "recursive encoded c", target: v1 + "instance/?re%63ursive=true", want: deny(RuleRecursive)},
		{name: "recursive fully encoded", target: v1 + "instance/?%72%65%63%75%72%73%69%76%65=true", want: deny(RuleRecursive)},
		{name: "recursive after other keys", target: v1 + "instance/?alt=json&recursive=true", want: deny(RuleRecursive)},
		{name: "recursive service-accounts dir", target: v1 + "instance/service-accounts/?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive root", target: "/?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive sa via dot dot", target: v1 + "instance/service-accounts/default/../../?recursive=true", want: deny(RuleRecursive)},
		{name: "recursive sa", target: v1 + "instance/service-accounts/default/?recursive=true", want: allow(RuleServiceAccountRecursive, v1+"instance/service-accounts/default/", "recursive=true")},
		{name: "recursive sa spelled", target: v1 + "instance/service-accounts/default/?Re%63ursive=True&alt=text", want: allow(RuleServiceAccountRecursive, v1+"instance/service-accounts/default/", "recursive=true&alt=text")},

		// recursive, filter mode.
		{name: "filter instance", mode: RecursiveFilter, target: v1 + "instance/?recursive=true", want: allow(RuleRecursiveFiltered, v1+"instance/", "recursive=true")},
		{name: "filter v1", mode: RecursiveFilter, target: v1 + "?recursive=true&wait_for_change=true", want: allow(RuleRecursiveFiltered, v1, "recursive=true&wait_for_change=true")},
		{name: "filter attributes alt text", mode: RecursiveFilter, target: v1 + "instance/attributes/?recursive=true&alt=text", want: deny(RuleRecursiveAltText)},
		{name: "filter v1 alt text", mode: RecursiveFilter, target: v1 + "?alt=text&recursive=true", want: deny(RuleRecursiveAltText)},
		{name: "filter project alt text", mode: RecursiveFilter, target: v1 + "project?alt=TEXT&recursive=true", want: deny(RuleRecursiveAltText)},
		{name: "filter tags alt text", mode: RecursiveFilter, target: v1 + "instance/tags?alt=text&recursive=true", want: allow(RuleRecursiveFiltered, v1+"instance/tags", "recursive=true&alt=text")},
		{name: "filter root still denied", mode: RecursiveFilter, target: "/?recursive=true", want: deny(RuleRecursive)},
		// recursive=false is GCE's default: never sent upstream, where a lenient reading
		// of the key would answer a listing the proxy does not filter (found by
		// FuzzProxyNeverLeaksConcealed).
		{name: "filter recursive false dropped", mode: RecursiveFilter, target: v1 + "instAnCe/AttriButes/?reCursive=fAlse", want: allow(RuleRecursiveFiltered, v1+"instAnCe/AttriButes/", "")},
		{name: "recursive false under sa dropped", target: v1 + "instance/service-accounts/default/?recursive=false&alt=text", want: allow(RuleServiceAccountRecursive, v1+"instance/service-accounts/default/", "alt=text")},
		{name: "filter kube-env still concealed", mode: RecursiveFilter, target: v1 + "instance/attributes/kube-env?recursive=true", want: conceal(RuleKubeEnv)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := mustPolicy(t, Config{Recursive: tc.mode})
			method := tc.method
			if method == "" {
				method = "GET"
			}
			d := p.Evaluate(method, tc.target, tc.xff)
			if d.Verdict != tc.want.verdict || d.Rule != tc.want.rule {
				t.Fatalf("Evaluate(%s %q) = %s/%s, want %s/%s", method, tc.target, d.Verdict, d.Rule, tc.want.verdict, tc.want.rule)
			}
			if d.Verdict != Allow {
				return
			}
			if d.Path != tc.want.path || d.RawQuery != tc.want.query {
				t.Errorf("canonical = %q ? %q, want %q ? %q", d.Path, d.RawQuery, tc.want.path, tc.want.query)
			}
			// The canonical form is a fixed point: evaluating it gives the same answer.
			canon := d.Path
			if d.RawQuery != "" {
				canon += "?" + d.RawQuery
			}
			again := p.Evaluate(method, canon, false)
			if again.Verdict != Allow || again.Path != d.Path || again.RawQuery != d.RawQuery {
				t.Errorf("canonical %q evaluates to %s/%s %q ? %q", canon, again.Verdict, again.Rule, again.Path, again.RawQuery)
			}
		})
	}
}

func TestLongPollFields(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{})
	d := p.Evaluate("GET", "/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=30", false)
	if !d.WaitForChange || d.TimeoutSec != 30 {
		t.Errorf("wait_for_change/timeout_sec = %v/%d, want true/30", d.WaitForChange, d.TimeoutSec)
	}
	d = p.Evaluate("GET", "/computeMetadata/v1/instance/tags?wait_for_change=false", false)
	if d.WaitForChange || d.TimeoutSec != -1 {
		t.Errorf("wait_for_change/timeout_sec = %v/%d, want false/-1", d.WaitForChange, d.TimeoutSec)
	}
}

func TestPolicyFile(t *testing.T) {
	t.Parallel()
	f, err := ParseFile([]byte(`{"concealPaths": ["instance/attributes/kube-labels", "instance/service-accounts/*/token"],
		"allowQueryKeys": [{"key": "Mode", "paths": ["instance/attributes/*"], "value": "fast|slow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	p := mustPolicy(t, Config{File: f})
	const v1 = "/computeMetadata/v1/"
	for target, want := range map[string]Rule{
		v1 + "instance/attributes/KUBE-LABELS":                                                  RuleConcealedPath,
		v1 + "instance/service-accounts/default/token":                                          RuleConcealedPath,
		v1 + "instance/service-accounts/x@y/token?scopes=https://www.googleapis.com/auth/a":     RuleConcealedPath,
		v1 + "instance/attributes/kube-env":                                                     RuleKubeEnv,
		v1 + "instance/attributes/cluster-name?mode=fast":                                       RuleV1,
		v1 + "instance/attributes/cluster-name?MODE=slow&alt=text":                              RuleV1,
		v1 + "instance/attributes/cluster-name?mode=recursive":                                  RuleBadQueryValue,
		v1 + "instance/attributes/cluster-name?mode=fastx":                                      RuleBadQueryValue,
		v1 + "instance/attributes/?mode=fast":                                                   RuleQueryKeyPath,
		v1 + "instance/tags?mode=fast":                                                          RuleQueryKeyPath,
		v1 + "instance/attributes/cluster-name?mode=fast&mode=fast":                             RuleDuplicateQueryKey,
		v1 + "instance/attributes/?recursive=true":                                              RuleRecursive,
		v1 + "instance/service-accounts/default/email?scopes=https://www.googleapis.com/auth/a": RuleQueryKeyPath,
	} {
		if d := p.Evaluate("GET", target, false); d.Rule != want {
			t.Errorf("%s: rule %s, want %s", target, d.Rule, want)
		}
	}
	d := p.Evaluate("GET", v1+"instance/attributes/cluster-name?MODE=slow&alt=text", false)
	if d.RawQuery != "alt=text&mode=slow" {
		t.Errorf("canonical query with extra key = %q", d.RawQuery)
	}
	for _, line := range []string{"conceal instance/attributes/kube-labels and below (policy-concealed-path)", "query mode matching ^(?:fast|slow)$ on instance/attributes/* (policy file)"} {
		if !slices.Contains(p.Effective(), line) {
			t.Errorf("Effective() = %q, missing %q", p.Effective(), line)
		}
	}
}

// The policy file is strict: every entry that would load and conceal nothing, or
// allow more than it says, is an error naming the entry.
func TestPolicyFileStrict(t *testing.T) {
	t.Parallel()
	cases := []struct{ name, body, wantInErr string }{
		{"unknown field", `{"concealPath": ["instance/x"]}`, "concealPath"},
		{"unknown nested field", `{"allowQueryKeys": [{"key": "a", "paths": ["instance/x"], "value": "x", "values": "y"}]}`, "values"},
		{"null file", `null`, "one JSON object"},
		{"null field", `{"concealPaths": null}`, "concealPaths: null"},
		{"null entry", `{"concealPaths": ["instance/x", null]}`, "concealPaths[1]: null"},
		{"array file", `[]`, "one JSON object"},
		{"empty file", ``, "decode"},
		{"duplicate key", `{"concealPaths": ["instance/a"], "concealPaths": ["instance/b"]}`, `key "concealPaths" given twice`},
		{"duplicate nested key", `{"allowQueryKeys": [{"key": "a", "key": "b", "paths": ["instance/x"], "value": "x"}]}`, `allowQueryKeys[0]: key "key" given twice`},
		{"duplicate path", `{"concealPaths": ["instance/a", "INSTANCE/a"]}`, "concealPaths[1]"},
		{"full path", `{"concealPaths": ["/computeMetadata/v1/instance/attributes/x"]}`, `concealPaths[0] "/computeMetadata/v1/instance/attributes/x": does not start with instance/ or project/`},
		{"leading slash", `{"concealPaths": ["/instance/attributes/x"]}`, `concealPaths[0]`},
		{"trailing space", `{"concealPaths": ["instance/attributes/x "]}`, `concealPaths[0] "instance/attributes/x ": whitespace`},
		{"leading space", `{"concealPaths": [" instance/attributes/x"]}`, `whitespace`},
		{"tab inside", `{"concealPaths": ["instance/attri\tbutes/x"]}`, `whitespace`},
		{"trailing slash", `{"concealPaths": ["instance/attributes/x/"]}`, "empty segment"},
		{"double slash", `{"concealPaths": ["instance//x"]}`, "empty segment"},
		{"other root", `{"concealPaths": ["attributes/x"]}`, "does not start with instance/ or project/"},
		{"empty pattern", `{"concealPaths": [""]}`, "empty"},
		{"dot pattern", `{"concealPaths": ["instance/../x"]}`, "dot segment"},
		{"encoded pattern", `{"concealPaths": ["instance/%6bube"]}`, "segment"},
		{"builtin key", `{"allowQueryKeys": [{"key": "recursive", "paths": ["instance/x"], "value": "true"}]}`, "built in"},
		{"builtin scopes", `{"allowQueryKeys": [{"key": "scopes", "paths": ["instance/x"], "value": ".*"}]}`, "built in"},
		{"bad key", `{"allowQueryKeys": [{"key": "a=b", "paths": ["instance/x"], "value": "x"}]}`, `allowQueryKeys[0] (key "a=b")`},
		{"old string form", `{"allowQueryKeys": ["scopes"]}`, "decode"},
		{"no paths", `{"allowQueryKeys": [{"key": "a", "value": "x"}]}`, "no paths"},
		{"no value", `{"allowQueryKeys": [{"key": "a", "paths": ["instance/x"]}]}`, "no value pattern"},
		{"bad regexp", `{"allowQueryKeys": [{"key": "a", "paths": ["instance/x"], "value": "("}]}`, "value pattern"},
		{"bad key path", `{"allowQueryKeys": [{"key": "a", "paths": ["computeMetadata/v1/instance/x"], "value": "x"}]}`, `paths[0]`},
		{"duplicate extra key", `{"allowQueryKeys": [{"key": "a", "paths": ["instance/x"], "value": "x"}, {"key": "A", "paths": ["instance/y"], "value": "y"}]}`, "allowQueryKeys[1]"},
		{"trailing data", `{} {}`, "trailing data"},
	}
	for _, tc := range cases {
		_, err := ParseFile([]byte(tc.body))
		if err == nil {
			t.Errorf("%s: policy file %s accepted, want an error", tc.name, tc.body)
			continue
		}
		if !strings.Contains(err.Error(), tc.wantInErr) {
			t.Errorf("%s: error %q does not name %q", tc.name, err, tc.wantInErr)
		}
	}
	// New validates a File built in code the same way.
	if _, err := New(Config{File: File{ConcealPaths: []string{"instance/x "}}}); err == nil {
		t.Error("New accepted a pattern with a trailing space")
	}
}

func TestParseRecursiveMode(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]RecursiveMode{"deny": RecursiveDeny, "filter": RecursiveFilter} {
		if got, err := ParseRecursiveMode(in); err != nil || got != want {
			t.Errorf("ParseRecursiveMode(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseRecursiveMode("allow"); err == nil {
		t.Error("ParseRecursiveMode(allow) succeeded")
	}
}

func TestRuleVerdicts(t *testing.T) {
	t.Parallel()
	for _, r := range Rules() {
		if r.String() == "unknown" || r.Description() == "" {
			t.Errorf("rule %d has no name or description", r)
		}
	}
}

func TestFilterListing(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{Recursive: RecursiveFilter, File: File{ConcealPaths: []string{"instance/attributes/secret"}}})
	cases := []struct {
		name, path, body string
		mustKeep         []string
		mustDrop         []string
	}{
		{
			name:     "v1 root",
			path:     "/computeMetadata/v1/",
			body:     `{"instance":{"attributes":{"kube-env":"KUBELET_KEY","cluster-name":"c","secret":"s"},"serviceAccounts":{"default":{"email":"e","identity":"JWT"}}},"project":{"attributes":{"Kube-Env":"P"},"projectId":"p","numericProjectId":12345678901234567890}}`,
			mustKeep: []string{`"cluster-name":"c"`, `"email":"e"`, `"projectId":"p"`, `12345678901234567890`},
			mustDrop: []string{"KUBELET_KEY", "JWT", `"s"`, `"P"`},
		},
		{
			name:     "attributes",
			path:     "/computeMetadata/v1/instance/attributes/",
			body:     `{"KUBE-ENV":"KUBELET_KEY","kubeEnv":"K2","other":"o"}`,
			mustKeep: []string{`"other":"o"`},
			mustDrop: []string{"KUBELET_KEY", "K2"},
		},
		{
			name:     "leaf value",
			path:     "/computeMetadata/v1/instance/tags",
			body:     `"text"`,
			mustKeep: []string{`"text"`},
		},
	}
	for _, tc := range cases {
		out, err := p.FilterListing(tc.path, []byte(tc.body))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		for _, s := range tc.mustKeep {
			if !strings.Contains(string(out), s) {
				t.Errorf("%s: filtered listing %s lost %s", tc.name, out, s)
			}
		}
		for _, s := range tc.mustDrop {
			if strings.Contains(string(out), s) {
				t.Errorf("%s: filtered listing %s still holds %s", tc.name, out, s)
			}
		}
	}
	// Arrays: a leaf's array answer passes; objects inside arrays are filtered.
	out, err := p.FilterListing("/computeMetadata/v1/instance/service-accounts/default/scopes", []byte(`["a","b"]`))
	if err != nil || string(out) != `["a","b"]` {
		t.Errorf("array listing: %s, %v", out, err)
	}
	out, err = p.FilterListing("/computeMetadata/v1/instance/", []byte(`{"networkInterfaces":[{"ip":"10.0.0.2","kube-env":"K"}]}`))
	if err != nil || strings.Contains(string(out), "K\"") || !strings.Contains(string(out), "10.0.0.2") {
		t.Errorf("objects in arrays: %s, %v", out, err)
	}
	for _, bad := range []string{`not json`, `{"a":1} {}`} {
		if _, err := p.FilterListing("/computeMetadata/v1/instance/", []byte(bad)); err == nil {
			t.Errorf("FilterListing(%s) succeeded, want an error", bad)
		}
	}
	if _, err := p.FilterListing("/", []byte(`{}`)); err == nil {
		t.Error("FilterListing outside v1 succeeded")
	}
}

// BenchmarkEvaluate measures the policy on the common request; it should not allocate.
func BenchmarkEvaluate(b *testing.B) {
	p := mustPolicy(b, Config{})
	b.ReportAllocs()
	for b.Loop() {
		if d := p.Evaluate("GET", "/computeMetadata/v1/project/project-id", false); d.Verdict != Allow {
			b.Fatal(d.Rule)
		}
	}
}

func TestExposedPolicy(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{}).Exposed()
	const v1 = "/computeMetadata/v1/"
	cases := []struct {
		target  string
		xff     bool
		verdict Verdict
		rule    Rule
	}{
		{v1 + "instance/attributes/kube-env", false, Allow, RuleExposedPod},
		{v1 + "instance/attributes/%6bube-env?alt=text", false, Allow, RuleExposedPod},
		{v1 + "instance/service-accounts/default/identity?audience=x", false, Allow, RuleExposedPod},
		{v1 + "instance/?recursive=true", false, Allow, RuleExposedPod},
		{v1 + "instance/attributes/?recursive=true&alt=text", false, Allow, RuleExposedPod},
		{v1 + "project/project-id", false, Allow, RuleV1},
		{"/computeMetadata/v1beta1/instance/attributes/kube-env", false, Deny, RuleLegacyAPI},
		{v1 + "instance/attributes/kube-env", true, Deny, RuleXForwardedFor},
		{v1 + "instance/attributes%252Fkube-env", false, Deny, RuleBadEscape},
		{v1 + "instance/?foo=bar", false, Deny, RuleUnknownQueryKey},
		{"/?recursive=true", false, Deny, RuleRecursive},
	}
	for _, tc := range cases {
		d := p.Evaluate("GET", tc.target, tc.xff)
		if d.Verdict != tc.verdict || d.Rule != tc.rule {
			t.Errorf("exposed %q: %s/%s, want %s/%s", tc.target, d.Verdict, d.Rule, tc.verdict, tc.rule)
		}
		if d.FilterListing {
			t.Errorf("exposed %q: listing filtered", tc.target)
		}
	}
	d := p.Evaluate("GET", v1+"Instance/./attributes//kube-env", false)
	if d.Path != v1+"Instance/attributes/kube-env" {
		t.Errorf("exposed pods still get the canonical path only: %q", d.Path)
	}
}
