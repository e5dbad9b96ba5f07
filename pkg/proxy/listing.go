package proxy

import (
	"fmt"
	"net/http"
	"strconv"
)

// Filtered recursive listings fail closed: a request that needs filtering is
// answered only from a 200 whose JSON has GCE's shape and, once filtered, names no
// concealed endpoint (policy.FilterListing). Anything else (another status, a body
// that is not such JSON, a body too large) is withheld with a 502 saying so. The
// answer carries only headers the proxy sets itself. HEAD is sent upstream as GET, so
// that it too is answered from a checked listing, with its real Content-Length.

// filteredAnswer checks and filters one upstream answer to a request that needs
// filtering, and returns the headers and body to send, or a *listingError.
func (a *answerer) filteredAnswer(path string, status int, upstreamHdr http.Header, body []byte) (http.Header, []byte, error) {
	if status != http.StatusOK {
		return nil, nil, &listingError{fmt.Errorf("the metadata server answered %d %s, not a listing", status, http.StatusText(status))}
	}
	filtered, err := a.policy.FilterListing(path, body)
	if err != nil {
		return nil, nil, &listingError{err}
	}
	hdr := http.Header{
		"Content-Type":    {"application/json"},
		"Metadata-Flavor": hdrGoogle,
		"Content-Length":  {strconv.Itoa(len(filtered))},
	}
	if etag := upstreamHdr.Get("ETag"); etag != "" && len(etag) <= 64 && isHexString(etag) {
		hdr["Etag"] = []string{etag}
	}
	return hdr, filtered, nil
}

func isHexString(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

// forwardFiltered serves an ordinary request whose answer must be filtered.
func (a *answerer) forwardFiltered(x *exchange) {
	if !a.takeUpstream(x) {
		return
	}
	defer a.upShare.give(x.cl.key)
	req := upstreamRequest{method: http.MethodGet, host: a.upstreamHost, path: x.d.Path, rawQuery: x.d.RawQuery, flavor: forwardedFlavor(x.r)}
	resp, err := a.send(x.r.Context(), &req)
	if err != nil {
		a.respond.failed(x, err, a.upstreamTimeout)
		return
	}
	body, err := readLimited(resp.Body)
	resp.Body.Close()
	var hdr http.Header
	if err == nil {
		hdr, body, err = a.filteredAnswer(x.d.Path, resp.StatusCode, resp.Header, body)
	} else {
		err = &listingError{err}
	}
	if err != nil {
		a.respond.withheld(x, err)
		return
	}
	rp := reply{status: http.StatusOK, header: hdr, body: body}
	rp.write(x)
}

// listingError is a recursive listing that could not be filtered.
type listingError struct{ err error }

func (e *listingError) Error() string { return e.err.Error() }
func (e *listingError) Unwrap() error { return e.err }
