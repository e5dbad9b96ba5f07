package policy

// Verdict is what the proxy does with a request.
type Verdict uint8

const (
	// Allow sends the canonical request upstream.
	Allow Verdict = iota
	// Conceal answers 403 with ConcealedBody: the endpoint exists but pods may not see it.
	Conceal
	// Deny answers 403 naming the rule: the request is malformed or ambiguous enough
	// that the proxy cannot be sure what the upstream would make of it.
	Deny
)

// String is the verdict's name in logs and metrics.
func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case Conceal:
		return "conceal"
	case Deny:
		return "deny"
	}
	return "unknown"
}

// Verdicts lists every verdict, for pre-creating metric series.
var Verdicts = []Verdict{Allow, Conceal, Deny}

// ConcealedBody is the exact body of a concealed answer, as GKE's concealment gives it.
const ConcealedBody = "This metadata endpoint is concealed.\n"

// Rule names the policy rule that decided a request. The set is closed, so that metric
// label values stay bounded.
type Rule uint8

const (
	RuleDiscovery Rule = iota
	RuleV1
	RuleServiceAccountRecursive
	RuleRecursiveFiltered
	RuleExposedPod
	RuleKubeEnv
	RuleIdentity
	RuleConcealedPath
	RuleMethod
	RuleXForwardedFor
	RuleRequestTarget
	RuleBadCharacter
	RuleBadEscape
	RuleBadPath
	RuleLegacyAPI
	RuleUnknownAPIVersion
	RuleSemicolonInQuery
	RuleUnknownQueryKey
	RuleDuplicateQueryKey
	RuleBadQueryValue
	RuleRecursive
	RuleRecursiveAltText
	RuleQueryKeyPath
	RuleRequestBody
	numRules
)

type ruleInfo struct {
	name        string
	description string
}

var ruleInfos = [numRules]ruleInfo{
	RuleDiscovery:               {"discovery", "discovery path (/, /computeMetadata/)"},
	RuleV1:                      {"v1", "path under /computeMetadata/v1/"},
	RuleServiceAccountRecursive: {"service-account-recursive", "recursive listing of a service account directory"},
	RuleRecursiveFiltered:       {"recursive-filtered", "recursive listing, concealed entries removed from the answer"},
	RuleExposedPod:              {"exposed-pod", "the pod's state record marks it exposed (mode EXPOSED or an excluded namespace): served in full"},
	RuleKubeEnv:                 {"kube-env", "kube-env holds kubelet credentials"},
	RuleIdentity:                {"identity", "service-accounts/<account>/identity mints VM identity tokens"},
	RuleConcealedPath:           {"policy-concealed-path", "path concealed by the policy file"},
	RuleMethod:                  {"method", "only GET and HEAD are allowed"},
	RuleXForwardedFor:           {"x-forwarded-for", "requests carrying X-Forwarded-For are refused, as GCE does"},
	RuleRequestTarget:           {"request-target", "only origin-form request targets (starting with /) are allowed; absolute-form, authority-form and asterisk-form are refused"},
	RuleBadCharacter:            {"bad-character", "backslash, control, non-ASCII, '#' or ';' characters in the path"},
	RuleBadEscape:               {"bad-escape", "invalid percent-encoding, double encoding, or an encoded character that is not allowed"},
	RuleBadPath:                 {"bad-path", "dot segments climb above the root"},
	RuleLegacyAPI:               {"legacy-api", "legacy metadata APIs /0.1/ and /computeMetadata/v1beta1/ do not require Metadata-Flavor and are refused"},
	RuleUnknownAPIVersion:       {"unknown-api-version", "only /computeMetadata/v1/ is served"},
	RuleSemicolonInQuery:        {"semicolon-in-query", "';' in the query string is ambiguous between parsers"},
	RuleUnknownQueryKey:         {"unknown-query-key", "query key not in the allowed set"},
	RuleDuplicateQueryKey:       {"duplicate-query-key", "a query key given twice is ambiguous between parsers"},
	RuleBadQueryValue:           {"bad-query-value", "query value outside GCE's grammar for its key (alt json|text, wait_for_change and recursive true|false, timeout_sec digits up to 3600, last_etag hex digits, scopes https://www.googleapis.com/auth/... URLs, or the policy file's pattern)"},
	RuleRecursive:               {"recursive", "recursive listings are allowed only under instance/service-accounts/<account>/"},
	RuleRecursiveAltText:        {"recursive-alt-text", "recursive alt=text listings of directories holding concealed entries cannot be filtered"},
	RuleQueryKeyPath:            {"query-key-path", "query key given on a path where GCE does not define it (scopes only on service-accounts/<account>/token, audience/format/licenses only on .../identity, alt/wait_for_change/last_etag/timeout_sec only under /computeMetadata/v1/, policy-file keys only on their paths)"},
	RuleRequestBody:             {"request-body", "GET and HEAD carry no body: a request announcing one (Content-Length, Transfer-Encoding) is refused and its connection closed"},
}

// String is the rule's stable name, used in metrics, logs and denied bodies.
func (r Rule) String() string {
	if r < numRules {
		return ruleInfos[r].name
	}
	return "unknown"
}

// Description says why the rule exists, for denied bodies and the docs.
func (r Rule) Description() string {
	if r < numRules {
		return ruleInfos[r].description
	}
	return ""
}

// Rules lists every rule, for pre-creating metric series and documentation.
func Rules() []Rule {
	rules := make([]Rule, numRules)
	for i := range rules {
		rules[i] = Rule(i)
	}
	return rules
}

// Verdict is the verdict a rule always leads to.
func (r Rule) Verdict() Verdict {
	switch r {
	case RuleDiscovery, RuleV1, RuleServiceAccountRecursive, RuleRecursiveFiltered, RuleExposedPod:
		return Allow
	case RuleKubeEnv, RuleIdentity, RuleConcealedPath:
		return Conceal
	}
	return Deny
}
