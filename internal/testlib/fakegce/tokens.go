package fakegce

import (
	"sync"
	"sync/atomic"
	"time"
)

// Access tokens as GCE's metadata server hands them out: one token per service account
// and scopes value, served again to every caller with expires_in counting down, and a
// new one minted once less than TokenRenewBefore of it remains (GCE's metadata server
// caches a token until it has about 5 minutes left). A proxy's cache is measured
// against this, not against a server that mints on every request.
const (
	TokenLifetime    = time.Hour
	TokenRenewBefore = 5 * time.Minute
)

type tokenKey struct {
	account *node // the account's directory: default/ and the email name the same one
	scopes  string
}

type fakeToken struct {
	value  string
	expiry time.Time
}

type tokenStore struct {
	mu     sync.Mutex
	tokens map[tokenKey]fakeToken
	minted atomic.Int64
}

// accessToken returns the token for the account whose token node is n, and its
// remaining lifetime in whole seconds (expires_in).
func (s *Server) accessToken(n *node, scopes string) (string, int64) {
	ts := &s.tokenStore
	now := time.Now()
	k := tokenKey{account: n.parent, scopes: scopes}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	tok, ok := ts.tokens[k]
	if !ok || tok.expiry.Sub(now) < TokenRenewBefore {
		if ts.tokens == nil {
			ts.tokens = map[tokenKey]fakeToken{}
		}
		tok = fakeToken{value: s.mintAccessToken(), expiry: now.Add(TokenLifetime)}
		ts.tokens[k] = tok
		ts.minted.Add(1)
	}
	// Whole seconds strictly left: a fresh token says 3599, as on GCE.
	return tok.value, int64((tok.expiry.Sub(now) - time.Nanosecond) / time.Second)
}

// TokensMinted reports how many access tokens the server has minted.
func (s *Server) TokensMinted() int64 { return s.tokenStore.minted.Load() }
