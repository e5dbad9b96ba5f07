package proxy

import (
	"net/http"
	"strings"
	"testing"

	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/selftest"
)

// TestSelftestEndpoint: the proxy echoes a well-formed nonce on the self-test path
// and never asks the upstream for it; anything else on that path goes to the policy.
func TestSelftestEndpoint(t *testing.T) {
	t.Parallel()
	f := newFixture(t, policy.RecursiveDeny, nil)
	nonce, err := selftest.NewNonce()
	if err != nil {
		t.Fatal(err)
	}
	a := raw(t, f.proxy.URL, "GET", selftest.PathPrefix+nonce, nil)
	if a.status != http.StatusOK || a.header.Get(selftest.Header) != nonce {
		t.Errorf("GET of the self-test path: %d, echo %q; want 200 and %q", a.status, a.header.Get(selftest.Header), nonce)
	}
	for _, c := range []struct{ method, target string }{
		{"GET", selftest.PathPrefix + strings.ToUpper(nonce)},
		{"GET", selftest.PathPrefix + "x"},
		{"HEAD", selftest.PathPrefix + nonce},
		{"GET", selftest.PathPrefix + nonce + "/more"},
	} {
		a := raw(t, f.proxy.URL, c.method, c.target, nil)
		if a.header.Get(selftest.Header) != "" || a.status == http.StatusOK {
			t.Errorf("%s %s: %d with echo %q; want no echo and the policy's answer", c.method, c.target, a.status, a.header.Get(selftest.Header))
		}
	}
	for _, uri := range f.receivedURIs() {
		if strings.Contains(uri, selftest.PathPrefix) && strings.Contains(uri, nonce) {
			t.Errorf("the upstream was asked for the self-test path: %s", uri)
		}
	}
}
