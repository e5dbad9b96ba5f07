package proxy

import (
	"net/http"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/selftest"
)

// serveSelftest answers the node agent's datapath self-test (pkg/selftest): GET
// selftest.PathPrefix+<nonce> gets 200 with the nonce echoed in selftest.Header, so
// the probe can tell that it reached the proxy and not the metadata server. It reveals
// nothing and never reaches the upstream. It reports whether it answered r.
func serveSelftest(w http.ResponseWriter, r *http.Request) bool {
	nonce, ok := strings.CutPrefix(r.URL.Path, selftest.PathPrefix)
	if !ok || r.Method != http.MethodGet || !selftest.ValidNonce(nonce) {
		return false
	}
	w.Header().Set(selftest.Header, nonce)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("metaconceal proxy self-test\n")) // the probe reads only the head
	return true
}
