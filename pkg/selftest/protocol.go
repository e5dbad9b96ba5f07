package selftest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
)

// The probe's request and the proxy's answer to it. The proxy (pkg/proxy) answers
// GET PathPrefix+<nonce> with 200 and Header set to the nonce, before any policy or
// upstream is involved; the metadata server knows no such path (404) and sets no such
// header. So an answer without the echo came from a server that is not the proxy, and
// no answer to this path ever carries a concealed value.
const (
	PathPrefix = "/metaconceal/selftest/"
	Header     = "Metaconceal-Selftest"
	// nonceBytes is the nonce's size before hex encoding.
	nonceBytes = 16
)

// NewNonce returns a fresh random nonce (32 hex digits).
func NewNonce() (string, error) {
	var b [nonceBytes]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("selftest: nonce: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// ValidNonce reports whether s has the shape of a nonce (32 lowercase hex digits): the
// proxy echoes nothing else.
func ValidNonce(s string) bool {
	if len(s) != 2*nonceBytes {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Request is the probe's HTTP request for nonce, as it goes on the wire.
func Request(nonce string) []byte {
	return []byte("GET " + PathPrefix + nonce + " HTTP/1.1\r\nHost: metadata.google.internal\r\n" +
		"Metadata-Flavor: Google\r\nUser-Agent: metaconceal-selftest\r\nConnection: close\r\n\r\n")
}

// maxHead bounds what is kept of an answer: its head only.
const maxHead = 16 << 10

// headEnd returns the length of the answer's head (status line and headers, with the
// blank line), or -1 while it is incomplete.
func headEnd(b []byte) int {
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		return i + 4
	}
	return -1
}

// enough tells the raw client to stop reading: the head is complete (the body is never
// read), or it is too long to be an HTTP head.
func enough(b []byte) bool { return headEnd(b) >= 0 || len(b) > maxHead }

// Verdict is what one probe found.
type Verdict string

const (
	// Effective: the probe reached the proxy (it echoed the nonce).
	Effective Verdict = "effective"
	// Blocked: nothing answered: the probe was dropped or reset on its way, so it
	// reached no server (the metadata server included). Counted as effective.
	Blocked Verdict = "blocked"
	// Bypassed: a server that is not the proxy answered: the metadata server, reached
	// around the guard.
	Bypassed Verdict = "bypassed"
)

// Guarded reports whether the verdict means the guard stood between the pod and the
// metadata server.
func (v Verdict) Guarded() bool { return v == Effective || v == Blocked }

// classify decides from the answer's head alone and returns its status line (the only
// part of an answer that is kept). ok is false when raw holds no complete HTTP head.
func classify(raw []byte, nonce string) (v Verdict, status string, ok bool) {
	n := headEnd(raw)
	if n < 0 {
		return "", "", false
	}
	head := string(raw[:n])
	lines := strings.Split(strings.TrimSuffix(head, "\r\n\r\n"), "\r\n")
	status = lines[0]
	if !strings.HasPrefix(status, "HTTP/1.") {
		return "", "", false
	}
	for _, l := range lines[1:] {
		name, value, found := strings.Cut(l, ":")
		if found && http.CanonicalHeaderKey(strings.TrimSpace(name)) == Header && strings.TrimSpace(value) == nonce {
			return Effective, status, true
		}
	}
	return Bypassed, status, true
}
