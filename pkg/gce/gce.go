// Package gce is the one place for Google Compute Engine's well-known addresses and
// ports that metaconceal depends on: where the metadata server answers, what else
// answers on the same address, and where GKE's own concealment put its responders.
// Everything else in the project refers to these names instead of repeating literals.
package gce

import "net/netip"

// Addresses.
var (
	// MetadataIPv4 is the metadata server's IPv4 address (metadata.google.internal).
	// On GCE it also serves the VPC's DNS resolver, the VM's NTP server and the ALTS
	// handshaker.
	MetadataIPv4 = netip.MustParseAddr("169.254.169.254")
	// MetadataIPv6 is the metadata server's IPv6 address on IPv6-enabled subnets.
	MetadataIPv6 = netip.MustParseAddr("fd20:ce::254")
	// ProxyIPv4 is the node-local address GKE's own metadata concealment listened on,
	// and metaconceal-proxy's default: never routed off the node.
	ProxyIPv4 = netip.MustParseAddr("169.254.169.252")
)

// Ports on the metadata address.
const (
	// MetadataPort is the metadata server's HTTP port (TCP).
	MetadataPort uint16 = 80
	// ALTSPort is the ALTS handshaker's port (TCP), used by gRPC DirectPath.
	ALTSPort uint16 = 8080
	// DNSPort is the VPC resolver's port (UDP and TCP).
	DNSPort uint16 = 53
	// NTPPort is the NTP server's port (UDP).
	NTPPort uint16 = 123
)

// Ports on the proxy address (GKE's choice, kept by metaconceal).
const (
	// ProxyPort is where metaconceal-proxy serves redirected metadata requests.
	ProxyPort uint16 = 988
	// ALTSRelayPort is where metaconceal-proxy relays redirected ALTS connections.
	ALTSRelayPort uint16 = 987
)

// MetadataHostname is the metadata server's DNS name; "metadata" also resolves to it
// on GCE through the VPC resolver's search domain.
const MetadataHostname = "metadata.google.internal"

// Defaults as host:port.
var (
	// Proxy is metaconceal-proxy's default listen address, 169.254.169.252:988.
	Proxy = netip.AddrPortFrom(ProxyIPv4, ProxyPort)
	// ALTSRelay is the ALTS relay's default listen address, 169.254.169.252:987.
	ALTSRelay = netip.AddrPortFrom(ProxyIPv4, ALTSRelayPort)
)

// PassPort is a port of the metadata address that pods keep reaching directly:
// DNS and NTP carry neither kube-env nor identity tokens.
type PassPort struct {
	Proto string // "udp" or "tcp"
	Port  uint16
}

// PassPorts are passed untouched by the per-pod rules and the host guard, in the order
// the rules list them.
var PassPorts = []PassPort{{"udp", DNSPort}, {"tcp", DNSPort}, {"udp", NTPPort}}
