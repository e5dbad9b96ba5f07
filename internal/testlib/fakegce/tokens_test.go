package fakegce

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
)

// The fake hands out one token per account and scopes value, as GCE's metadata
// server does, with expires_in counting down from the token's lifetime.
func TestAccessTokensReused(t *testing.T) {
	t.Parallel()
	fake := New(WithServiceAccountEmail("node@p.iam.gserviceaccount.com"))
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	token := func(target string) (string, int64) {
		t.Helper()
		a := get(t, ts.URL, target, flavor)
		if a.status != 200 {
			t.Fatalf("%s: %d %q", target, a.status, a.body)
		}
		if strings.Contains(target, "alt=text") {
			var tok string
			var exp int64 = -1
			for line := range strings.SplitSeq(a.body, "\n") {
				k, v, _ := strings.Cut(line, " ")
				switch k {
				case "access_token":
					tok = v
				case "expires_in":
					if err := json.Unmarshal([]byte(v), &exp); err != nil {
						t.Fatalf("%s: expires_in %q", target, v)
					}
				}
			}
			return tok, exp
		}
		var v struct {
			AccessToken string `json:"access_token"`
			ExpiresIn   int64  `json:"expires_in"`
		}
		if err := json.Unmarshal([]byte(a.body), &v); err != nil {
			t.Fatalf("%s: %q: %v", target, a.body, err)
		}
		return v.AccessToken, v.ExpiresIn
	}
	const tokenPath = v1 + "instance/service-accounts/default/token"
	first, exp := token(tokenPath)
	if exp < int64(TokenLifetime.Seconds())-2 || exp > int64(TokenLifetime.Seconds())-1 {
		t.Errorf("fresh token expires_in %d, want about %d", exp, int64(TokenLifetime.Seconds()))
	}
	for _, target := range []string{tokenPath, tokenPath + "?alt=text", v1 + "instance/service-accounts/node@p.iam.gserviceaccount.com/token"} {
		if tok, _ := token(target); tok != first {
			t.Errorf("%s: token %q, want the same %q (one token per account)", target, tok, first)
		}
	}
	scoped, _ := token(tokenPath + "?scopes=https://www.googleapis.com/auth/cloud-platform")
	if scoped == first || scoped == "" {
		t.Errorf("scoped token %q, want one of its own", scoped)
	}
	if n := fake.TokensMinted(); n != 2 {
		t.Errorf("%d tokens minted, want 2 (default scopes, cloud-platform)", n)
	}
}
