package proxy

import "testing"

// current: the request a drained poll is answered from keeps everything but the
// waiting.
func TestReqKeyCurrent(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ query, want string }{
		{"wait_for_change=true", ""},
		{"last_etag=abc&timeout_sec=60&wait_for_change=true", ""},
		{"alt=json&last_etag=abc&recursive=true&wait_for_change=true", "alt=json&recursive=true"},
		{"alt=text", "alt=text"},
		{"", ""},
	} {
		k := reqKey{path: "/computeMetadata/v1/instance/tags", query: tc.query, flags: keyFlavor | keyHead, flavor: "Google"}
		got := k.current()
		if got.query != tc.want || got.path != k.path || got.flags != k.flags || got.flavor != k.flavor {
			t.Errorf("current(%q) = %+v; want query %q and the rest kept", tc.query, got, tc.want)
		}
	}
}
