package proxy

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// lenientUpstream is a metadata server that reads its query loosely, as the worst
// real one might: every key and value is decoded as far as it goes, and any of them
// mentioning "recursive" turns on a recursive listing, "text" or "json" picks alt.
// It then serves the fake's answer. A proxy that passed free text upstream
// (last_etag=recursive, an extra key's value) would get a recursive listing, kube-env
// in it, from this server.
//
// instant makes long polls answer at once (as if their timeout had passed): the
// oracle replays every request the proxy sent with all its keys and values, and
// needs the answer, not the wait.
type lenientUpstream struct {
	fake    *fakegce.Server
	instant bool
}

func (l lenientUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	loose := strings.ToLower(r.URL.RawQuery)
	for range 3 { // decode as often as it changes anything
		if dec, err := url.QueryUnescape(loose); err == nil {
			loose = strings.ToLower(dec)
		}
	}
	q := url.Values{}
	for part := range strings.SplitSeq(loose, "&") {
		for p := range strings.SplitSeq(part, ";") {
			k, v, _ := strings.Cut(p, "=")
			switch {
			case k == "wait_for_change" && strings.Contains(v, "true"):
				q.Set("wait_for_change", "true")
			case k == "last_etag":
				q.Set("last_etag", v)
			case k == "timeout_sec":
				digits := strings.TrimLeft(v, "+")
				if digits != "" && strings.Trim(digits, "0123456789") == "" && len(digits) < 6 {
					q.Set("timeout_sec", digits)
				}
			}
			switch {
			case strings.Contains(v, "text"):
				q.Set("alt", "text")
			case strings.Contains(v, "json"):
				q.Set("alt", "json")
			}
		}
	}
	if strings.Contains(loose, "recursive") {
		q.Set("recursive", "true")
	}
	if q.Get("alt") == "text" && q.Get("recursive") == "true" {
		q.Del("alt") // JSON listings carry the keys the check below looks for
	}
	if l.instant {
		q.Set("timeout_sec", "0")
	}
	r2 := r.Clone(r.Context())
	r2.URL.RawQuery = q.Encode()
	r2.RequestURI = r2.URL.RequestURI()
	l.fake.ServeHTTP(w, r2)
}

// lenientReplayLeaks replays a request the upstream received, every key and value
// kept, against a fresh lenient fake that answers long polls at once, and reports
// whether the answer carries kube-env content or an identity token.
func lenientReplayLeaks(t *testing.T, method, requestURI string, header http.Header) bool {
	t.Helper()
	req := httptest_NewRequest(method, requestURI)
	req.Header = header.Clone()
	rec := &recorder{header: http.Header{}}
	lenientUpstream{fake: fakegce.New(), instant: true}.ServeHTTP(rec, req)
	return hasMarker(rec.body.String())
}

// The lenient upstream is lenient: free text that names recursive gets a recursive
// listing from it, kube-env included. Were it not, the tests using it would prove
// nothing.
func TestLenientUpstreamReadsFreeTextAsRecursive(t *testing.T) {
	t.Parallel()
	hdr := http.Header{"Metadata-Flavor": {"Google"}}
	for _, uri := range []string{
		v1 + "instance/attributes/?last_etag=recursive",
		v1 + "instance/attributes/?wait_for_change=true&last_etag=RECURSIVE&timeout_sec=600",
		v1 + "instance/?x=re%63ursive",
	} {
		if !lenientReplayLeaks(t, "GET", uri, hdr) {
			t.Errorf("%s: the lenient upstream did not answer a recursive listing with kube-env", uri)
		}
	}
	if lenientReplayLeaks(t, "GET", v1+"instance/attributes/?last_etag=d34db33f", hdr) {
		t.Error("the lenient upstream leaks without free text: it proves nothing")
	}
}
