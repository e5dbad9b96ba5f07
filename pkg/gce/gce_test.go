package gce

import "testing"

// The addresses and ports are GCE's and GKE's, not ours to choose: a change here must be
// deliberate, and this test makes it one.
func TestWellKnown(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ got, want string }{
		{MetadataIPv4.String(), "169.254.169.254"},
		{MetadataIPv6.String(), "fd20:ce::254"},
		{Proxy.String(), "169.254.169.252:988"},
		{ALTSRelay.String(), "169.254.169.252:987"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s, want %s", tc.got, tc.want)
		}
	}
	if MetadataPort != 80 || ALTSPort != 8080 || DNSPort != 53 || NTPPort != 123 {
		t.Errorf("ports %d %d %d %d", MetadataPort, ALTSPort, DNSPort, NTPPort)
	}
	if !MetadataIPv4.IsLinkLocalUnicast() || !ProxyIPv4.IsLinkLocalUnicast() {
		t.Error("GCE's metadata and proxy IPv4 addresses are link-local: never routed off the node")
	}
	want := []PassPort{{"udp", 53}, {"tcp", 53}, {"udp", 123}}
	if len(PassPorts) != len(want) {
		t.Fatalf("PassPorts %v, want %v", PassPorts, want)
	}
	for i := range want {
		if PassPorts[i] != want[i] {
			t.Errorf("PassPorts %v, want %v", PassPorts, want)
		}
	}
}
