package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/policy"
)

// Red-team corpus: requests a pod could send to metaconceal-proxy to reach kube-env
// or an identity token, or to make the upstream see something other than what the
// policy checked. Each goes over a real TCP connection to the real handler and
// http.Server in front of the (deliberately lenient) fake GCE server, in both
// recursive modes, and is checked three ways:
//
//   - the client's answer never carries kube-env content or an identity token;
//   - every request the upstream received is the canonical form the policy decided
//     on (decoded path and query equal to the Decision's), and, replayed against a
//     second fake, is not one the upstream answers with concealed content (unless
//     it is a recursive listing the proxy filters on the way back);
//   - the verdict is the one expected (allow / conceal / deny:<rule>, or "reject"
//     when net/http itself refuses the request line before the policy sees it).

const v1 = "/computeMetadata/v1/"

type attack struct {
	name   string
	method string // GET when empty
	target string
	// want is the expected outcome per mode; wantFilter overrides it in filter mode.
	want, wantFilter string
}

var redTeamAttacks = []attack{
	// Percent-encoding of dots, slashes and letters.
	{name: "encoded dot dot lower", target: v1 + "instance/attributes/%2e%2e/attributes/kube-env", want: "conceal"},
	{name: "encoded dot dot upper", target: v1 + "instance/attributes/%2E%2E/attributes/kube-env", want: "conceal"},
	{name: "half encoded dot dot", target: v1 + "instance/attributes/x/.%2e/kube-env", want: "conceal"},
	{name: "encoded single dot", target: v1 + "instance/attributes/%2E/kube-env", want: "conceal"},
	{name: "dot encoded slash", target: v1 + "instance/attributes/.%2Fkube-env", want: "conceal"},
	{name: "kube-env then encoded slash dot", target: v1 + "instance/attributes/kube-env%2f%2e", want: "conceal"},
	{name: "kube-env dot dot back", target: v1 + "instance/attributes/kube-env/../kube-env", want: "conceal"},
	{name: "kube-env dot dot away lists names", target: v1 + "instance/attributes/kube-env/..", want: "allow"},
	{name: "v1 via encoded slash", target: "/computeMetadata%2Fv1/instance/attributes/kube-env", want: "conceal"},
	{name: "leading dot segment", target: "/./computeMetadata/v1/instance/attributes/kube-env", want: "conceal"},
	{name: "mixed case everything", target: v1 + "INSTANCE/Attributes/kUbE-eNv", want: "conceal"},
	{name: "project kube-env", target: v1 + "project/attributes/kube-env", want: "conceal"},
	{name: "project kube-env upper slash", target: v1 + "project/attributes/KUBE-ENV/", want: "conceal"},
	{name: "double encoded dot dot", target: v1 + "instance/attributes/%252e%252e/kube-env", want: "deny:bad-escape"},
	{name: "double encoded k", target: v1 + "instance/attributes/%256Bube-env", want: "deny:bad-escape"},
	{name: "overlong utf-8 dot", target: v1 + "instance/attributes/x/%c0%ae%c0%ae/kube-env", want: "deny:bad-escape"},
	{name: "overlong utf-8 slash", target: v1 + "instance/attributes%c0%afkube-env", want: "deny:bad-escape"},
	{name: "kelvin sign encoded", target: v1 + "instance/attributes/%E2%84%AAube-env", want: "deny:bad-escape"},
	{name: "kelvin sign raw", target: v1 + "instance/attributes/\u212aube-env", want: "deny:bad-character"},
	{name: "long s encoded", target: v1 + "instance/%C5%BFervice-accounts/default/identity", want: "deny:bad-escape"},
	{name: "long s raw", target: v1 + "instance/\u017fervice-accounts/default/identity", want: "deny:bad-character"},
	{name: "fullwidth k encoded", target: v1 + "instance/attributes/%EF%BD%8Bube-env", want: "deny:bad-escape"},
	{name: "fullwidth k raw", target: v1 + "instance/attributes/\uff4bube-env", want: "deny:bad-character"},
	{name: "fullwidth solidus", target: v1 + "instance/attributes\uff0fkube-env", want: "deny:bad-character"},
	{name: "encoded nul", target: v1 + "instance/attributes/kube-env%00", want: "deny:bad-escape"},
	{name: "encoded newline", target: v1 + "instance/attributes/kube-env%0a", want: "deny:bad-escape"},
	{name: "encoded crlf", target: v1 + "project/project-id%0d%0aX-Forwarded-For:%201", want: "deny:bad-escape"},
	{name: "encoded tab", target: v1 + "instance/attributes/kube-env%09", want: "deny:bad-escape"},
	{name: "encoded del", target: v1 + "instance/attributes/kube-env%7f", want: "deny:bad-escape"},
	{name: "raw tab", target: v1 + "instance/attributes/kube-env\t", want: "reject"},
	{name: "trailing dot is another name", target: v1 + "instance/attributes/kube-env.", want: "allow"},
	{name: "trailing encoded space", target: v1 + "instance/attributes/kube-env%20", want: "allow"},
	{name: "encoded space inside", target: v1 + "instance/attributes/kube%20env", want: "allow"},
	{name: "plus inside", target: v1 + "instance/attributes/kube+env", want: "allow"},
	{name: "underscore", target: v1 + "instance/attributes/kube_env", want: "allow"},
	{name: "tilde", target: v1 + "instance/attributes/kube-env~", want: "allow"},
	{name: "every printable special raw", target: v1 + "instance/attributes/a!$&'()*+,:=@[]{}|^`\"<>b", want: "allow"},
	{name: "every printable special encoded", target: v1 + "instance/attributes/a%20%21%22%24%26%27%28%29%2A%2B%2C%3A%3C%3D%3E%40%5B%5D%5E%60%7B%7C%7D%7Eb", want: "allow"},

	// Path parameters, fragments, '?' hidden in the path.
	{name: "path param", target: v1 + "instance/attributes/kube-env;a=b", want: "deny:bad-character"},
	{name: "path param on dir", target: v1 + "instance/attributes;x/kube-env", want: "deny:bad-character"},
	{name: "encoded semicolon", target: v1 + "instance/attributes/kube-env%3B", want: "deny:bad-escape"},
	{name: "fragment", target: v1 + "instance/attributes/kube-env#x", want: "deny:bad-character"},
	{name: "encoded fragment", target: v1 + "project/project-id%23/../../attributes/kube-env", want: "deny:bad-escape"},
	{name: "encoded question mark hides query", target: v1 + "instance/attributes/%3Frecursive=true", want: "deny:bad-escape"},
	{name: "fragment in query", target: v1 + "instance/?recursive=true#x", want: "deny:bad-character"},
	{name: "question mark in query value", target: v1 + "instance/?alt=json?recursive=true", want: "deny:bad-query-value"},

	// API versions in other spellings.
	{name: "legacy 0.1 upper meta-data", target: "/0.1/META-DATA/attributes/kube-env", want: "deny:legacy-api"},
	{name: "legacy 0.1 encoded dot", target: "/0%2E1/meta-data/attributes/kube-env", want: "deny:legacy-api"},
	{name: "legacy 0.1 encoded digit", target: "/%30.1/meta-data/attributes/kube-env", want: "deny:legacy-api"},
	{name: "v1beta1 encoded", target: "/computeMetadata/%76%31beta1/instance/attributes/kube-env", want: "deny:legacy-api"},
	{name: "v1beta1 via encoded dot dot", target: "/computeMetadata/v1%2F..%2Fv1beta1/instance/attributes/kube-env", want: "deny:legacy-api"},
	{name: "V1 upper", target: "/computeMetadata/V1/instance/attributes/kube-env", want: "deny:unknown-api-version"},
	{name: "host in path", target: "//metadata.google.internal/computeMetadata/v1/instance/attributes/kube-env", want: "deny:unknown-api-version"},

	// Long paths.
	{name: "many dot segments", target: v1 + "instance/" + strings.Repeat("./", 3000) + "attributes/kube-env", want: "conceal"},
	{name: "many climbs", target: v1 + strings.Repeat("a/../", 1500) + "instance/attributes/kube-env", want: "conceal"},
	{name: "many empty segments", target: v1 + "instance" + strings.Repeat("/", 5000) + "attributes/kube-env", want: "conceal"},
	{name: "longer than the header limit", target: v1 + strings.Repeat("a/../", 8000) + "instance/attributes/kube-env", want: "reject"},

	// Query keys and values.
	{name: "duplicate recursive", target: v1 + "instance/attributes/?recursive=false&recursive=true", want: "deny:duplicate-query-key"},
	{name: "duplicate recursive spelled", target: v1 + "instance/attributes/?recursive=true&Re%63ursive=false", want: "deny:duplicate-query-key"},
	{name: "duplicate alt", target: v1 + "instance/attributes/?alt=text&recursive=true&alt=json", want: "deny:duplicate-query-key"},
	{name: "recursive 1", target: v1 + "instance/attributes/?recursive=1", want: "deny:bad-query-value"},
	{name: "recursive t", target: v1 + "instance/attributes/?recursive=T", want: "deny:bad-query-value"},
	{name: "recursive encoded value", target: v1 + "instance/attributes/?recursive=%74rue", want: "deny:recursive", wantFilter: "allow"},
	{name: "recursive key plus", target: v1 + "instance/attributes/?recursive+=true", want: "deny:unknown-query-key"},
	{name: "recursive key space", target: v1 + "instance/attributes/?%20recursive=true", want: "deny:unknown-query-key"},
	{name: "recursive value nul", target: v1 + "instance/attributes/?recursive=true%00", want: "deny:bad-escape"},
	{name: "recursive alt text", target: v1 + "instance/attributes/?recursive=true&alt=text", want: "deny:recursive", wantFilter: "deny:recursive-alt-text"},
	{name: "recursive alt encoded text", target: v1 + "instance/attributes/?recursive=true&alt=%74ext", want: "deny:recursive", wantFilter: "deny:recursive-alt-text"},
	{name: "recursive alt json", target: v1 + "instance/attributes/?recursive=true&alt=json", want: "deny:recursive", wantFilter: "allow"},
	{name: "recursive v1", target: v1 + "?recursive=true", want: "deny:recursive", wantFilter: "allow"},
	{name: "recursive root", target: "/?recursive=true", want: "deny:recursive"},
	{name: "recursive discovery", target: "/computeMetadata/?recursive=true", want: "deny:recursive"},
	{name: "recursive project alt text", target: v1 + "project/?recursive=true&alt=text", want: "deny:recursive", wantFilter: "deny:recursive-alt-text"},
	{name: "recursive kube-env leaf", target: v1 + "instance/attributes/kube-env?recursive=false", want: "conceal"},
	{name: "attributes long poll lists names", target: v1 + "instance/attributes/?wait_for_change=true&last_etag=0", want: "allow"},
	{name: "attributes recursive long poll", target: v1 + "instance/attributes/?recursive=true&wait_for_change=true&last_etag=0", want: "deny:recursive", wantFilter: "allow"},
	{name: "attributes recursive text long poll", target: v1 + "instance/attributes/?recursive=true&alt=text&wait_for_change=true&last_etag=0", want: "deny:recursive", wantFilter: "deny:recursive-alt-text"},
	{name: "v1 recursive long poll", target: v1 + "?wait_for_change=true&recursive=true&last_etag=0", want: "deny:recursive", wantFilter: "allow"},

	// Service accounts: identity is minted on request and never listed.
	{name: "service-accounts parent recursive", target: v1 + "instance/service-accounts/?recursive=true", want: "deny:recursive", wantFilter: "allow"},
	{name: "service-accounts parent recursive text", target: v1 + "instance/service-accounts/?recursive=true&alt=text", want: "deny:recursive", wantFilter: "allow"},
	{name: "account recursive", target: v1 + "instance/service-accounts/default/?recursive=true", want: "allow"},
	{name: "account recursive json", target: v1 + "instance/service-accounts/default/?recursive=true&alt=json", want: "allow"},
	{name: "account recursive text", target: v1 + "instance/service-accounts/default/?recursive=true&alt=text", want: "allow"},
	{name: "account by email recursive text", target: v1 + "instance/service-accounts/123456789012-compute@developer.gserviceaccount.com/?recursive=true&alt=text", want: "allow"},
	{name: "account recursive long poll", target: v1 + "instance/service-accounts/default/?recursive=true&wait_for_change=true&last_etag=0", want: "allow"},
	{name: "account recursive with audience", target: v1 + "instance/service-accounts/default/?recursive=true&audience=x", want: "deny:query-key-path"},
	{name: "account dir climbing out", target: v1 + "instance/service-accounts/default/..%2F..%2Fattributes/?recursive=true", want: "deny:recursive", wantFilter: "allow"},
	{name: "account named kube-env", target: v1 + "instance/service-accounts/kube-env/?recursive=true", want: "conceal"},
	{name: "identity full format", target: v1 + "instance/service-accounts/default/identity?audience=x&format=full", want: "conceal"},
	{name: "identity encoded slash", target: v1 + "instance/service-accounts/default%2Fidentity?audience=x", want: "conceal"},
	{name: "identity upper dirs", target: v1 + "INSTANCE/SERVICE-ACCOUNTS/DEFAULT/IDENTITY?audience=x", want: "conceal"},
	{name: "identity dot dot from token", target: v1 + "instance/service-accounts/default/token/../identity?audience=x", want: "conceal"},
	{name: "identity long poll", target: v1 + "instance/service-accounts/default/identity?audience=x&wait_for_change=true&last_etag=0", want: "conceal"},
	{name: "recursive leaf text", target: v1 + "instance/hostname?recursive=true&alt=text", want: "deny:recursive", wantFilter: "allow"},

	// Request targets and methods.
	{name: "absolute form", target: "http://metadata.google.internal/computeMetadata/v1/instance/attributes/kube-env", want: "deny:request-target"},
	{name: "absolute form allowed path", target: "http://metadata.google.internal/computeMetadata/v1/project/project-id", want: "deny:request-target"},
	{name: "absolute form https", target: "https://169.254.169.254/computeMetadata/v1/project/project-id", want: "deny:request-target"},
	{name: "connect", method: "CONNECT", target: "metadata.google.internal:80", want: "deny:method"},
	{name: "options asterisk", method: "OPTIONS", target: "*", want: "deny:method"},
	{name: "trace", method: "TRACE", target: v1 + "project/project-id", want: "deny:method"},
	{name: "lower-case get", method: "get", target: v1 + "project/project-id", want: "deny:method"},
	{name: "head kube-env", method: "HEAD", target: v1 + "instance/attributes/%6bube-env", want: "conceal"},
	{name: "head recursive", method: "HEAD", target: v1 + "instance/?recursive=true", want: "deny:recursive", wantFilter: "allow"},
}

// outcome names what happened to a request: allow, conceal, deny:<rule>, or reject
// (net/http refused it before the handler).
func outcome(a answer) string {
	switch {
	case a.status == 403 && a.header.Get("Content-Type") == "text/plain; charset=utf-8" &&
		(a.body == policy.ConcealedBody || a.body == ""):
		if a.body == "" {
			return "conceal-or-deny" // HEAD: no body tells them apart
		}
		return "conceal"
	case a.status == 403 && strings.HasPrefix(a.body, "Request denied by metaconceal rule "):
		rule, _, _ := strings.Cut(strings.TrimPrefix(a.body, "Request denied by metaconceal rule "), ":")
		return "deny:" + rule
	case a.status == 400 || a.status == 431 || a.status == 414:
		return "reject"
	case a.status >= 500:
		return fmt.Sprintf("error-%d", a.status)
	}
	return "allow"
}

func hasMarker(s string) bool {
	return strings.Contains(s, fakegce.KubeEnvMarker) || strings.Contains(s, fakegce.IdentityTokenMarker)
}

func (f *fixture) reset() {
	f.mu.Lock()
	f.received = nil
	f.mu.Unlock()
}

func (f *fixture) receivedRequests() []*http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*http.Request(nil), f.received...)
}

// replayLeaks replays a request the upstream received, every query key and value
// kept, against a fresh lenient fake (lenientUpstream, answering long polls at once)
// and reports whether the answer carries concealed content.
func replayLeaks(t *testing.T, r *http.Request) bool {
	t.Helper()
	return lenientReplayLeaks(t, r.Method, r.RequestURI, r.Header)
}

// httptest_NewRequest is httptest.NewRequest without its URL cleaning surprises:
// the request target is parsed exactly as a server would.
func httptest_NewRequest(method, target string) *http.Request {
	req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(method + " " + target + " HTTP/1.1\r\nHost: metadata.google.internal\r\n\r\n")))
	if err != nil {
		panic(fmt.Sprintf("replay %s %q: %v", method, target, err))
	}
	return req
}

type recorder struct {
	header http.Header
	body   bytes.Buffer
	code   int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(p []byte) (int, error) { return r.body.Write(p) }
func (r *recorder) WriteHeader(code int)        { r.code = code }

func TestRedTeamRequests(t *testing.T) {
	t.Parallel()
	for _, mode := range []policy.RecursiveMode{policy.RecursiveDeny, policy.RecursiveFilter} {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, mode, nil)
			pol, err := policy.New(policy.Config{Recursive: mode})
			if err != nil {
				t.Fatal(err)
			}
			for _, tc := range redTeamAttacks {
				method := tc.method
				if method == "" {
					method = "GET"
				}
				want := tc.want
				if mode == policy.RecursiveFilter && tc.wantFilter != "" {
					want = tc.wantFilter
				}
				f.reset()
				a := raw(t, f.proxy.URL, method, tc.target, flavor)
				shown := short(tc.target)
				if hasMarker(a.body) {
					t.Errorf("%s: %s %q: the client got concealed content: %d %q", tc.name, method, shown, a.status, a.body)
				}
				got := outcome(a)
				if got == "conceal-or-deny" && (want == "conceal" || strings.HasPrefix(want, "deny:")) {
					got = want
				}
				if got != want {
					t.Errorf("%s: %s %q: %s (%d %q), want %s", tc.name, method, shown, got, a.status, a.body, want)
				}
				reached := f.receivedRequests()
				if got != "allow" {
					if len(reached) != 0 {
						t.Errorf("%s: blocked, but %d request(s) reached the upstream: %q", tc.name, len(reached), reached[0].RequestURI)
					}
					continue
				}
				d := pol.Evaluate(method, tc.target, false)
				if len(reached) != 1 {
					t.Errorf("%s: allowed, %d upstream requests, want 1", tc.name, len(reached))
					continue
				}
				r := reached[0]
				wantMethod := method
				if d.FilterListing {
					wantMethod = "GET" // a filtered HEAD is answered from a checked listing
				}
				if r.URL.Path != d.Path || r.URL.RawQuery != d.RawQuery || r.Method != wantMethod {
					t.Errorf("%s: the upstream received %s %q (path %q query %q), the policy checked %q ? %q",
						tc.name, r.Method, r.RequestURI, r.URL.Path, r.URL.RawQuery, d.Path, d.RawQuery)
				}
				if !d.FilterListing && replayLeaks(t, r) {
					t.Errorf("%s: %q went upstream as %q, which the upstream answers with concealed content", tc.name, shown, r.RequestURI)
				}
			}
		})
	}
}

// rawExchange writes request bytes as they are on one connection and reads every
// answer until the server closes it.
func rawExchange(t *testing.T, base, request string) []answer {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	var out []answer
	for {
		resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			return out
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		out = append(out, answer{resp.StatusCode, resp.Header, string(body), resp.Close})
		if resp.Close {
			return out
		}
	}
}

// Header tricks and request framing: X-Forwarded-For in other spellings, headers
// that are never forwarded, Host games, HTTP/1.0 without Host, smuggling-style
// bodies on GET and pipelining. No answer may carry concealed content, and the
// upstream sees only the canonical request, Host and Metadata-Flavor.
func TestRedTeamHeadersAndFraming(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	const (
		kubeEnv = v1 + "instance/attributes/kube-env"
		allowed = v1 + "project/project-id"
	)
	type framing struct {
		name    string
		request string
		// want is the outcome of each answer on the connection, in order.
		want []string
	}
	get := func(target string, headers ...string) string {
		return "GET " + target + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n" + strings.Join(headers, "") + "\r\n"
	}
	cases := []framing{
		{"x-forwarded-for lower case", get(allowed, "x-forwarded-for: 10.0.0.1\r\n", "Connection: close\r\n"), []string{"deny:x-forwarded-for"}},
		{"x-forwarded-for empty", get(allowed, "X-Forwarded-For:\r\n", "Connection: close\r\n"), []string{"deny:x-forwarded-for"}},
		{"x-forwarded-for twice", get(allowed, "X-Forwarded-For: a\r\nX-FORWARDED-FOR: b\r\n", "Connection: close\r\n"), []string{"deny:x-forwarded-for"}},
		{"forwarded", get(allowed, "Forwarded: for=10.0.0.1\r\n", "Connection: close\r\n"), []string{"allow"}},
		{"x-forwarded-host", get(allowed, "X-Forwarded-Host: evil\r\nX-Original-URL: "+kubeEnv+"\r\nX-Rewrite-URL: "+kubeEnv+"\r\n", "Connection: close\r\n"), []string{"allow"}},
		{"x_forwarded_for underscore", get(allowed, "X_Forwarded_For: 10.0.0.1\r\n", "Connection: close\r\n"), []string{"allow"}},
		{"x-google-metadata-request instead", "GET " + allowed + " HTTP/1.1\r\nHost: x\r\nX-Google-Metadata-Request: True\r\nConnection: close\r\n\r\n", []string{"allow"}},
		{"flavor lower case and twice", "GET " + allowed + " HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: google\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", []string{"allow"}},
		{"host is the metadata ip", "GET " + kubeEnv + " HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", []string{"conceal"}},
		{"host with path", "GET " + allowed + " HTTP/1.1\r\nHost: x/computeMetadata/v1/instance/attributes/kube-env\r\nConnection: close\r\n\r\n", []string{"reject"}},
		{"two hosts", "GET " + allowed + " HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", []string{"reject"}},
		{"http/1.0 without host", "GET " + allowed + " HTTP/1.0\r\nMetadata-Flavor: Google\r\n\r\n", []string{"allow"}},
		{"http/1.0 kube-env", "GET " + kubeEnv + " HTTP/1.0\r\nMetadata-Flavor: Google\r\n\r\n", []string{"conceal"}},
		{"http/0.9", "GET " + kubeEnv + "\r\n\r\n", []string{"reject"}},
		{"absolute form with host", "GET http://metadata.google.internal" + kubeEnv + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n", []string{"deny:request-target"}},
		{"pipelined allowed then kube-env",
			get(allowed) + get(kubeEnv, "Connection: close\r\n"),
			[]string{"allow", "conceal"}},
		{"kube-env smuggled as a GET body",
			get(allowed, fmt.Sprintf("Content-Length: %d\r\n", len(get(kubeEnv)))) + get(kubeEnv) + get(allowed, "Connection: close\r\n"),
			[]string{"deny:request-body"}},
		{"transfer-encoding and content-length",
			get(allowed, "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n") + "0\r\n\r\n" + get(kubeEnv, "Connection: close\r\n"),
			[]string{"deny:request-body"}},
		{"chunked body hides a request",
			get(allowed, "Transfer-Encoding: chunked\r\n") + fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(get(kubeEnv)), get(kubeEnv)) + get(kubeEnv, "Connection: close\r\n"),
			[]string{"deny:request-body"}},
		{"expect continue", get(allowed, "Expect: 100-continue\r\nContent-Length: 3\r\n", "Connection: close\r\n") + "abc", []string{"deny:request-body"}},
		{"empty body announced is no body", get(allowed, "Content-Length: 0\r\n", "Connection: close\r\n"), []string{"allow"}},
		{"upgrade h2c", get(kubeEnv, "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n", "Connection: close\r\n"), []string{"conceal"}},
	}
	for _, tc := range cases {
		f.reset()
		answers := rawExchange(t, f.proxy.URL, tc.request)
		var got []string
		for _, a := range answers {
			if hasMarker(a.body) {
				t.Errorf("%s: the client got concealed content: %d %q", tc.name, a.status, a.body)
			}
			got = append(got, outcome(a))
		}
		if strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("%s: answers %q, want %q", tc.name, got, tc.want)
		}
		for _, r := range f.receivedRequests() {
			if replayLeaks(t, r) {
				t.Errorf("%s: the upstream received %q, which it answers with concealed content", tc.name, r.RequestURI)
			}
			for k := range r.Header {
				switch k {
				case "Metadata-Flavor", "Accept-Encoding", "User-Agent":
				default:
					t.Errorf("%s: header %s reached the upstream", tc.name, k)
				}
			}
		}
	}
}

// short cuts a target for messages.
func short(s string) string {
	if len(s) > 200 {
		return s[:100] + "..." + s[len(s)-60:]
	}
	return s
}
