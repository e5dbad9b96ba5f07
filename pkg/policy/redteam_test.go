package policy

import (
	"strings"
	"testing"
)

// Red-team corpus at the policy level (the same attempts go through the real proxy
// and the fake upstream in pkg/proxy's TestRedTeamRequests): what each spelling is
// decided as, and whether a recursive answer is filtered on the way back.
func TestRedTeamEvaluate(t *testing.T) {
	t.Parallel()
	const v1 = "/computeMetadata/v1/"
	type want struct {
		verdict Verdict
		rule    Rule
		filter  bool // FilterListing
	}
	conceal := func(r Rule) want { return want{Conceal, r, false} }
	deny := func(r Rule) want { return want{Deny, r, false} }
	allow := func(r Rule, filter bool) want { return want{Allow, r, filter} }
	cases := []struct {
		target string
		mode   RecursiveMode
		want   want
	}{
		// Encodings the upstream could decode into kube-env or identity.
		{v1 + "instance/attributes/%2E%2E/attributes/kube-env", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + "instance/attributes/x/.%2e/kube-env", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + "instance/attributes/kube-env%2f%2e", RecursiveDeny, conceal(RuleKubeEnv)},
		{"/computeMetadata%2Fv1/instance/attributes/kube-env", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + "instance/service-accounts/default%2Fidentity", RecursiveDeny, conceal(RuleIdentity)},
		{v1 + "instance/service-accounts/default/token/../identity", RecursiveDeny, conceal(RuleIdentity)},
		{v1 + "instance/service-accounts/kube-env/?recursive=true", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + "instance/" + strings.Repeat("./", 3000) + "attributes/kube-env", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + strings.Repeat("a/../", 1500) + "instance/attributes/kube-env", RecursiveDeny, conceal(RuleKubeEnv)},
		{v1 + "instance/attributes/%252e%252e/kube-env", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/attributes/x/%c0%ae%c0%ae/kube-env", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/attributes%c0%afkube-env", RecursiveDeny, deny(RuleBadEscape)},
		// Unicode case folding: KELVIN SIGN folds to k, LONG S to s (strings.EqualFold
		// and the lenient fake agree); non-ASCII never gets that far.
		{v1 + "instance/attributes/%E2%84%AAube-env", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/attributes/\u212aube-env", RecursiveDeny, deny(RuleBadCharacter)},
		{v1 + "instance/%C5%BFervice-accounts/default/identity", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/\u017fervice-accounts/default/identity", RecursiveDeny, deny(RuleBadCharacter)},
		{v1 + "instance/attributes/%EF%BD%8Bube-env", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/attributes/?re%E2%84%AAursive=true", RecursiveFilter, deny(RuleBadEscape)},
		{v1 + "instance/attributes/kube-env%3B", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "instance/attributes/%3Frecursive=true", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "project/project-id%23/../../attributes/kube-env", RecursiveDeny, deny(RuleBadEscape)},
		{v1 + "project/project-id%0d%0aX-Forwarded-For:%201", RecursiveDeny, deny(RuleBadEscape)},
		{"/0%2E1/meta-data/attributes/kube-env", RecursiveDeny, deny(RuleLegacyAPI)},
		{"/computeMetadata/v1%2F..%2Fv1beta1/instance/attributes/kube-env", RecursiveDeny, deny(RuleLegacyAPI)},
		{"//metadata.google.internal/computeMetadata/v1/instance/attributes/kube-env", RecursiveDeny, deny(RuleUnknownAPIVersion)},

		// Query keys: duplicates in any spelling, values GCE reads as true.
		{v1 + "instance/attributes/?recursive=false&recursive=true", RecursiveFilter, deny(RuleDuplicateQueryKey)},
		{v1 + "instance/attributes/?recursive=true&Re%63ursive=false", RecursiveFilter, deny(RuleDuplicateQueryKey)},
		{v1 + "instance/attributes/?recursive=1", RecursiveFilter, deny(RuleBadQueryValue)},
		{v1 + "instance/attributes/?recursive+=true", RecursiveFilter, deny(RuleUnknownQueryKey)},
		{v1 + "instance/?alt=json?recursive=true", RecursiveFilter, deny(RuleBadQueryValue)},

		// Recursive listings: which are filtered, which are refused as text.
		{v1 + "instance/attributes/?recursive=%74rue", RecursiveFilter, allow(RuleRecursiveFiltered, true)},
		{v1 + "instance/attributes/?recursive=true&alt=%74ext", RecursiveFilter, deny(RuleRecursiveAltText)},
		{v1 + "instance/attributes/?recursive=true&alt=text&wait_for_change=true", RecursiveFilter, deny(RuleRecursiveAltText)},
		{v1 + "instance/attributes/?recursive=true&wait_for_change=true", RecursiveFilter, allow(RuleRecursiveFiltered, true)},
		{v1 + "instance/attributes/?recursive=false", RecursiveFilter, allow(RuleRecursiveFiltered, false)},
		{v1 + "instance/attributes/?wait_for_change=true", RecursiveDeny, allow(RuleV1, false)},
		{v1 + "instance/service-accounts/?recursive=true", RecursiveDeny, deny(RuleRecursive)},
		{v1 + "instance/service-accounts/?recursive=true", RecursiveFilter, allow(RuleRecursiveFiltered, true)},
		{v1 + "instance/service-accounts/default/..%2F..%2Fattributes/?recursive=true", RecursiveDeny, deny(RuleRecursive)},
		// A text listing of a directory holding no listed concealed entry has nothing
		// to filter and is not JSON: it is passed, not withheld as unfilterable.
		{v1 + "instance/service-accounts/?recursive=true&alt=text", RecursiveFilter, allow(RuleRecursiveFiltered, false)},
		{v1 + "instance/service-accounts/default/?recursive=true&alt=text", RecursiveDeny, allow(RuleServiceAccountRecursive, false)},
		{v1 + "instance/service-accounts/default/?recursive=true&alt=json", RecursiveDeny, allow(RuleServiceAccountRecursive, true)},
		{v1 + "instance/hostname?recursive=true&alt=text", RecursiveFilter, allow(RuleRecursiveFiltered, false)},
	}
	for _, tc := range cases {
		p := mustPolicy(t, Config{Recursive: tc.mode})
		for _, method := range []string{"GET", "HEAD"} {
			d := p.Evaluate(method, tc.target, false)
			shown := tc.target
			if len(shown) > 120 {
				shown = shown[:60] + "..." + shown[len(shown)-40:]
			}
			if d.Verdict != tc.want.verdict || d.Rule != tc.want.rule || d.FilterListing != tc.want.filter {
				t.Errorf("%s: %s %q = %s/%s filter=%v, want %s/%s filter=%v", tc.mode, method, shown,
					d.Verdict, d.Rule, d.FilterListing, tc.want.verdict, tc.want.rule, tc.want.filter)
			}
			if d.Verdict != Allow {
				continue
			}
			if strings.Contains(d.Path, "%") || strings.Contains(d.Path, "/./") || strings.Contains(d.Path, "/../") || strings.Contains(d.Path, "//") {
				t.Errorf("%s %q: canonical path %q is not canonical", method, shown, d.Path)
			}
		}
	}
}

// Pods marked exposed get recursive listings unfiltered; the proxy must tell their
// polls apart from concealed pods' (pkg/proxy TestExposedAndConcealedPollsDoNotShareAnAnswer):
// the two decisions for the same request differ in FilterListing and Rule.
func TestExposedDecisionDiffersForSharedRequests(t *testing.T) {
	t.Parallel()
	p := mustPolicy(t, Config{Recursive: RecursiveFilter})
	const target = "/computeMetadata/v1/instance/attributes/?recursive=true&wait_for_change=true"
	c, e := p.Evaluate("GET", target, false), p.Exposed().Evaluate("GET", target, false)
	if c.Path != e.Path || c.RawQuery != e.RawQuery {
		t.Fatalf("canonical forms differ: %q?%q vs %q?%q", c.Path, c.RawQuery, e.Path, e.RawQuery)
	}
	if !c.FilterListing || e.FilterListing || e.Rule != RuleExposedPod {
		t.Errorf("concealed filter=%v, exposed filter=%v rule %s: want filtered vs unfiltered exposed-pod", c.FilterListing, e.FilterListing, e.Rule)
	}
}
