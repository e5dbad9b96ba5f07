// Package netconf parses and validates the metaconceal plugin's entry in a CNI
// conflist, fills in defaults, and reads the Kubernetes pod arguments from CNI_ARGS.
//
// Every validation failure is a *types.Error with code 7 (invalid network config) whose
// message names the key and the bad value, so that an operator can fix the conflist
// from the runtime's log line alone.
package netconf

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/state"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Mode says whether the plugin conceals the metadata server. The values and their
// meaning follow GKE's --workload-metadata-from-node flag.
type Mode string

const (
	// ModeSecure passes DNS and NTP to the metadata addresses, redirects port 80 to
	// the proxy and port 8080 to its ALTS relay (see ALTS), and rejects every other
	// packet to them.
	ModeSecure Mode = "SECURE"
	// ModeExposed installs nothing: pods reach the metadata server directly.
	ModeExposed Mode = "EXPOSED"
	// ModeUnspecified behaves like ModeExposed, as it does on GKE.
	ModeUnspecified Mode = "UNSPECIFIED"
)

// Conceals reports whether the mode installs rules.
func (m Mode) Conceals() bool { return m == ModeSecure }

// ALTS says what happens to TCP port 8080 of the metadata addresses, where GCE serves
// the ALTS handshaker that gRPC DirectPath uses.
type ALTS string

const (
	// ALTSRelay DNATs it to metaconceal-proxy's ALTS relay, as GKE did.
	ALTSRelay ALTS = "relay"
	// ALTSReject rejects it like every other port.
	ALTSReject ALTS = "reject"
)

// Defaults, as documented in docs/ ("Configuration" of the CNI plugin).
var (
	DefaultMode            = ModeSecure
	DefaultProxy           = gce.Proxy.String()
	DefaultMetadataAddress = gce.MetadataIPv4.String()
	DefaultBackend         = xtables.BackendAuto
	DefaultALTS            = ALTSRelay
)

// Config is the plugin's conflist entry. The JSON fields keep what the user wrote
// (after defaults); the unexported-by-JSON fields hold the parsed forms.
type Config struct {
	types.NetConf

	Mode              Mode            `json:"mode,omitempty"`
	Proxy             string          `json:"proxy,omitempty"`
	Proxy6            string          `json:"proxy6,omitempty"`
	MetadataAddresses []string        `json:"metadataAddresses,omitempty"`
	StateDir          string          `json:"stateDir,omitempty"`
	ExcludeNamespaces []string        `json:"excludeNamespaces,omitempty"`
	LogFile           string          `json:"logFile,omitempty"`
	IptablesBackend   xtables.Backend `json:"iptablesBackend,omitempty"`
	// ALTS is the treatment of metadata port 8080; AltsRelay and AltsRelay6 override
	// where "relay" sends it (default: the proxy's address, port 987).
	ALTS       ALTS   `json:"alts,omitempty"`
	AltsRelay  string `json:"altsRelay,omitempty"`
	AltsRelay6 string `json:"altsRelay6,omitempty"`

	// ProxyAddr is Proxy parsed: where IPv4 metadata port 80 is sent.
	ProxyAddr netip.AddrPort `json:"-"`
	// Proxy6Addr is Proxy6 parsed; invalid (zero) when unset, in which case IPv6
	// metadata traffic is rejected rather than redirected.
	Proxy6Addr netip.AddrPort `json:"-"`
	// ALTSAddr and ALTS6Addr are where IPv4 and IPv6 metadata port 8080 is sent;
	// invalid (zero) when it is rejected instead (alts "reject", or IPv6 without proxy6).
	ALTSAddr  netip.AddrPort `json:"-"`
	ALTS6Addr netip.AddrPort `json:"-"`
	// Metadata4 and Metadata6 are MetadataAddresses parsed and split by family.
	Metadata4 []netip.Addr `json:"-"`
	Metadata6 []netip.Addr `json:"-"`
}

// InvalidConfig builds the code-7 error every validation failure returns.
func InvalidConfig(format string, args ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, "metaconceal: invalid config: "+fmt.Sprintf(format, args...), "")
}

// Parse decodes the plugin's stdin configuration, applies defaults and validates it.
// It does not look at prevResult: whether one is required depends on the verb.
func Parse(stdin []byte) (*Config, error) {
	conf := &Config{}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(conf); err != nil {
		return nil, InvalidConfig("cannot decode network configuration: %v", err)
	}
	if err := conf.applyDefaultsAndValidate(); err != nil {
		return nil, err
	}
	return conf, nil
}

func (c *Config) applyDefaultsAndValidate() error {
	switch c.Mode {
	case "":
		c.Mode = DefaultMode
	case ModeSecure, ModeExposed, ModeUnspecified:
	default:
		return InvalidConfig("key %q: unknown value %q (want %q, %q or %q)", "mode", c.Mode, ModeSecure, ModeExposed, ModeUnspecified)
	}

	if c.Proxy == "" {
		c.Proxy = DefaultProxy
	}
	proxy, err := parseProxy("proxy", c.Proxy, false)
	if err != nil {
		return err
	}
	c.ProxyAddr = proxy

	if c.Proxy6 != "" {
		proxy6, err := parseProxy("proxy6", c.Proxy6, true)
		if err != nil {
			return err
		}
		c.Proxy6Addr = proxy6
	}

	if err := c.parseALTS(); err != nil {
		return err
	}

	if c.MetadataAddresses == nil {
		c.MetadataAddresses = []string{DefaultMetadataAddress}
	}
	if len(c.MetadataAddresses) == 0 {
		return InvalidConfig("key %q: empty list; list at least one metadata address, or set mode %q to install nothing", "metadataAddresses", ModeExposed)
	}
	seen := map[netip.Addr]bool{}
	for _, s := range c.MetadataAddresses {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return InvalidConfig("key %q: value %q is not an IP address", "metadataAddresses", s)
		}
		switch {
		case a.Zone() != "":
			return InvalidConfig("key %q: value %q carries a zone; zones are not supported", "metadataAddresses", s)
		case a.Is4In6():
			return InvalidConfig("key %q: value %q is an IPv4-mapped IPv6 address; write it as IPv4", "metadataAddresses", s)
		case a.IsUnspecified() || a.IsMulticast():
			return InvalidConfig("key %q: value %q is not a unicast address", "metadataAddresses", s)
		case seen[a]:
			return InvalidConfig("key %q: value %q is listed twice", "metadataAddresses", s)
		case a == c.ProxyAddr.Addr() || (c.Proxy6Addr.IsValid() && a == c.Proxy6Addr.Addr()):
			return InvalidConfig("key %q: value %q is also the proxy address; redirected traffic would be rejected", "metadataAddresses", s)
		case (c.ALTSAddr.IsValid() && a == c.ALTSAddr.Addr()) || (c.ALTS6Addr.IsValid() && a == c.ALTS6Addr.Addr()):
			return InvalidConfig("key %q: value %q is also the ALTS relay address; relayed traffic would be rejected", "metadataAddresses", s)
		}
		seen[a] = true
		if a.Is4() {
			c.Metadata4 = append(c.Metadata4, a)
		} else {
			c.Metadata6 = append(c.Metadata6, a)
		}
	}

	if c.StateDir == "" {
		c.StateDir = state.DefaultDir
	}
	if !filepath.IsAbs(c.StateDir) {
		return InvalidConfig("key %q: value %q is not an absolute path", "stateDir", c.StateDir)
	}
	c.StateDir = filepath.Clean(c.StateDir)

	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		return InvalidConfig("key %q: value %q is not an absolute path", "logFile", c.LogFile)
	}

	for _, ns := range c.ExcludeNamespaces {
		if strings.TrimSpace(ns) == "" || ns != strings.TrimSpace(ns) {
			return InvalidConfig("key %q: value %q is not a namespace name", "excludeNamespaces", ns)
		}
	}

	// The names and what they run are pkg/xtables's, as for the host guard.
	if c.IptablesBackend == "" {
		c.IptablesBackend = DefaultBackend
	}
	if c.IptablesBackend.Validate() != nil {
		return InvalidConfig("key %q: unknown value %q (want %s)", "iptablesBackend", c.IptablesBackend, xtables.BackendChoices)
	}
	return nil
}

// parseALTS validates "alts", "altsRelay" and "altsRelay6" and sets ALTSAddr and
// ALTS6Addr; it runs after the proxy addresses are parsed.
func (c *Config) parseALTS() error {
	switch c.ALTS {
	case "":
		c.ALTS = DefaultALTS
	case ALTSRelay, ALTSReject:
	default:
		return InvalidConfig("key %q: unknown value %q (want %q or %q)", "alts", c.ALTS, ALTSRelay, ALTSReject)
	}
	if c.ALTS == ALTSReject {
		if c.AltsRelay != "" || c.AltsRelay6 != "" {
			return InvalidConfig("keys %q and %q need %q %q, not %q", "altsRelay", "altsRelay6", "alts", ALTSRelay, c.ALTS)
		}
		return nil
	}
	var err error
	if c.AltsRelay == "" {
		c.ALTSAddr = netip.AddrPortFrom(c.ProxyAddr.Addr(), gce.ALTSRelayPort)
	} else if c.ALTSAddr, err = parseProxy("altsRelay", c.AltsRelay, false); err != nil {
		return err
	}
	switch {
	case c.AltsRelay6 != "":
		if c.ALTS6Addr, err = parseProxy("altsRelay6", c.AltsRelay6, true); err != nil {
			return err
		}
	case c.Proxy6Addr.IsValid():
		c.ALTS6Addr = netip.AddrPortFrom(c.Proxy6Addr.Addr(), gce.ALTSRelayPort)
	}
	return nil
}

func parseProxy(key, value string, wantIPv6 bool) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(value)
	if err != nil {
		want := "IPv4:port, e.g. " + DefaultProxy
		if wantIPv6 {
			want = "[IPv6]:port, e.g. [fd20:ce::252]:" + fmt.Sprint(gce.ProxyPort)
		}
		return netip.AddrPort{}, InvalidConfig("key %q: value %q is not %s", key, value, want)
	}
	a := ap.Addr()
	switch {
	case a.Zone() != "":
		return netip.AddrPort{}, InvalidConfig("key %q: value %q carries a zone; zones are not supported", key, value)
	case !wantIPv6 && !a.Is4():
		return netip.AddrPort{}, InvalidConfig("key %q: value %q is not an IPv4 address and port (IPv6 goes in %q)", key, value, "proxy6")
	case wantIPv6 && (!a.Is6() || a.Is4In6()):
		return netip.AddrPort{}, InvalidConfig("key %q: value %q is not an IPv6 address and port", key, value)
	case a.IsUnspecified() || a.IsMulticast():
		return netip.AddrPort{}, InvalidConfig("key %q: value %q is not a unicast address", key, value)
	case a.IsLoopback():
		// DNAT from a pod to loopback needs route_localnet (CVE-2020-8558) and would
		// reach the pod's own lo anyway, not the node's.
		return netip.AddrPort{}, InvalidConfig("key %q: value %q is a loopback address; use a node-local address such as %s", key, value, DefaultProxy)
	case ap.Port() == 0:
		return netip.AddrPort{}, InvalidConfig("key %q: value %q has port 0", key, value)
	}
	return ap, nil
}

// Excluded reports whether pods of this namespace are passed through untouched.
func (c *Config) Excluded(namespace string) bool {
	return namespace != "" && slices.Contains(c.ExcludeNamespaces, namespace)
}

// PodArgs are the Kubernetes keys a runtime passes in CNI_ARGS.
type PodArgs struct {
	Namespace string
	Name      string
	UID       string
}

// ParsePodArgs reads K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID from a CNI_ARGS
// string ("K1=V1;K2=V2"). Other keys are ignored, whatever IgnoreUnknown says: the
// plugin only reads these, it never rejects a call for arguments meant for others.
func ParsePodArgs(cniArgs string) PodArgs {
	var p PodArgs
	for pair := range strings.SplitSeq(cniArgs, ";") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		}
	}
	return p
}
