package hostguard

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"strconv"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Settings are what the guard's config is derived from: where the proxy and its
// ALTS relay listen, its upstream, and the operator's choices.
type Settings struct {
	// Listen are the proxy's listen addresses.
	Listen []netip.AddrPort
	// ALTSListen are the ALTS relay's listen addresses; none means the relay is off
	// and the guard rejects the ALTS port instead of redirecting it.
	ALTSListen []netip.AddrPort
	// Upstream is the real metadata server: its host, when an IP, is the address
	// pods try to reach, and its port the port.
	Upstream *url.URL
	// MetadataAddrs, when set, replace the default guarded addresses.
	MetadataAddrs []netip.Addr
	// Backend selects the iptables programs; empty is xtables.BackendAuto.
	Backend xtables.Backend
	// ConnRate and ConnBurst are the new TCP connections per second and burst per
	// source IP to the listen addresses (0 rate: no limit; see ChainLimit).
	ConnRate, ConnBurst uint32
	// IPv6 says whether the node has an IPv6 stack (IPv6Enabled on a real node). With
	// it, GCE's IPv6 metadata address is guarded too by default.
	IPv6 bool
}

// A SettingError is a Settings value the guard cannot use. Setting names the field
// ("ConnBurst"), so that a caller can say which of its own settings to change; the
// error itself names the value.
type SettingError struct {
	Setting string
	Err     error
}

func (e *SettingError) Error() string { return e.Err.Error() }
func (e *SettingError) Unwrap() error { return e.Err }

func settingErr(setting string, err error) error { return &SettingError{Setting: setting, Err: err} }

// IPv6Enabled reports whether the current network namespace has an IPv6 stack
// (booting with ipv6.disable=1 removes it, and ip6tables cannot be programmed then).
func IPv6Enabled() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
}

// ConfigFrom derives and validates the guard's config: every error a later Install or
// Remove would find in the config is reported here, before anything is changed.
//
// Without --metadata-addr the guarded addresses are the upstream's IP (GCE's metadata
// address when the upstream is a name) and, when the node has IPv6, GCE's IPv6
// metadata address: with an IPv6 listen address pods' TCP to it is redirected, without
// one every packet to it is rejected (fail closed), so that a dual-stack pod that
// bypassed its own rules gets nothing over IPv6.
func ConfigFrom(s Settings) (Config, error) {
	cfg := Config{ListenAddrs: s.Listen, ALTSListenAddrs: s.ALTSListen, MetadataAddrs: s.MetadataAddrs, Backend: s.Backend}
	if cfg.Backend == "" {
		cfg.Backend = xtables.BackendAuto
	}
	if err := cfg.Backend.Validate(); err != nil {
		return cfg, settingErr("Backend", fmt.Errorf("hostguard: %w", err))
	}
	if len(s.Listen) == 0 {
		return cfg, settingErr("Listen", errors.New("hostguard: no listen address to redirect to"))
	}
	if err := checkTargets("listen address", s.Listen, gce.Proxy); err != nil {
		return cfg, settingErr("Listen", err)
	}
	if err := checkTargets("ALTS relay listen address", s.ALTSListen, gce.ALTSRelay); err != nil {
		return cfg, settingErr("ALTSListen", err)
	}
	if err := checkMetadataAddrs(s.MetadataAddrs); err != nil {
		return cfg, settingErr("MetadataAddrs", err)
	}
	if s.ConnRate > maxConnRate {
		return cfg, settingErr("ConnRate", fmt.Errorf("hostguard: connection rate %d per second per source: want 0 (off) to %d", s.ConnRate, maxConnRate))
	}
	if err := validateConnLimit(s.ConnRate, s.ConnBurst); err != nil {
		return cfg, settingErr("ConnBurst", err)
	}
	if s.ConnRate > 0 {
		cfg.ConnRate, cfg.ConnBurst = s.ConnRate, s.ConnBurst
	}
	if s.Upstream == nil {
		return cfg, settingErr("Upstream", errors.New("hostguard: no upstream to derive the metadata address and port from"))
	}
	if len(cfg.MetadataAddrs) == 0 {
		ip, err := netip.ParseAddr(s.Upstream.Hostname())
		if err != nil {
			ip = gce.MetadataIPv4
		}
		cfg.MetadataAddrs = []netip.Addr{ip}
		if ip.Unmap().Is4() && s.IPv6 {
			cfg.MetadataAddrs = append(cfg.MetadataAddrs, gce.MetadataIPv6)
		}
	}
	if p := s.Upstream.Port(); p != "" {
		port, err := strconv.ParseUint(p, 10, 16)
		if err != nil || port == 0 {
			return cfg, settingErr("Upstream", fmt.Errorf("hostguard: upstream port %q: want 1-65535", p))
		}
		cfg.MetadataPort = uint16(port)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// Validate reports what Install and Remove would refuse in c.
func (c Config) Validate() error {
	_, err := c.normalized()
	return err
}

// Config says what to guard and where to send it.
type Config struct {
	// ListenAddrs are the proxy's listen addresses; TCP to the metadata port is
	// DNATed to the first one of the same family, and each is put on lo if missing.
	ListenAddrs []netip.AddrPort
	// MetadataAddrs are the metadata server's addresses (default 169.254.169.254).
	MetadataAddrs []netip.Addr
	// MetadataPort is the metadata server's port (default 80).
	MetadataPort uint16
	// ALTSListenAddrs are the ALTS relay's listen addresses; TCP to the metadata
	// addresses' ALTSPort is DNATed to the first one of the same family, and each is
	// put on lo if missing. Without one of a family, that port is rejected.
	ALTSListenAddrs []netip.AddrPort
	// ALTSPort is the ALTS handshaker's port on the metadata server (default 8080).
	ALTSPort uint16
	// ConnRate limits, per source IP, new TCP connections per second to each listen
	// address (the proxy's and the relay's) in ChainLimit; 0 turns the limit off.
	ConnRate uint32
	// ConnBurst is how many new connections a source may open at once before
	// ConnRate applies (1-10000 when ConnRate is set).
	ConnBurst uint32
	// Attest are the ports of the attested listeners (attest.go); zero is
	// DefaultAttestPorts.
	Attest AttestPorts
	// KeepConntrack skips deleting the conntrack entries of pod connections that
	// reached the metadata server directly (tests that inspect them use it).
	KeepConntrack bool
	// Backend selects the iptables programs (pkg/xtables); empty is
	// xtables.BackendAuto, iptables on PATH.
	Backend xtables.Backend
}

// DefaultMetadataAddr is GCE's metadata server address.
var DefaultMetadataAddr = gce.MetadataIPv4

func (c Config) normalized() (Config, error) {
	if len(c.ListenAddrs) == 0 {
		return c, errors.New("hostguard: no listen address to redirect to")
	}
	if err := checkTargets("listen address", c.ListenAddrs, gce.Proxy); err != nil {
		return c, err
	}
	if err := checkTargets("ALTS relay listen address", c.ALTSListenAddrs, gce.ALTSRelay); err != nil {
		return c, err
	}
	if len(c.MetadataAddrs) == 0 {
		c.MetadataAddrs = []netip.Addr{DefaultMetadataAddr}
	}
	if err := checkMetadataAddrs(c.MetadataAddrs); err != nil {
		return c, err
	}
	if c.MetadataPort == 0 {
		c.MetadataPort = gce.MetadataPort
	}
	if c.ALTSPort == 0 {
		c.ALTSPort = gce.ALTSPort
	}

	var err error
	if c.Attest, err = c.Attest.normalized(c); err != nil {
		return c, err
	}
	if err := validateConnLimit(c.ConnRate, c.ConnBurst); err != nil {
		return c, err
	}
	if c.Backend == "" {
		c.Backend = xtables.BackendAuto
	}
	if err := c.Backend.Validate(); err != nil {
		return c, fmt.Errorf("hostguard: %w", err)
	}
	return c, nil
}

// checkMetadataAddrs refuses guarded addresses that are not specific.
func checkMetadataAddrs(addrs []netip.Addr) error {
	for _, a := range addrs {
		if !a.IsValid() || a.IsUnspecified() {
			return fmt.Errorf("hostguard: metadata address %q is not a specific address", a)
		}
	}
	return nil
}

// checkTargets validates listen addresses of which the first of each family is a DNAT
// target.
func checkTargets(what string, addrs []netip.AddrPort, example netip.AddrPort) error {
	for _, ap := range addrs {
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().IsUnspecified() {
			return fmt.Errorf("hostguard: %s %q: want a specific address and a non-zero port", what, ap)
		}
	}
	seenFamily := map[bool]bool{}
	for _, ap := range addrs {
		v6 := ap.Addr().Unmap().Is6()
		if seenFamily[v6] {
			continue
		}
		seenFamily[v6] = true
		// The first address of each family is the DNAT target: the kernel drops
		// packets from pods DNATed to loopback (unless route_localnet is set).
		if ap.Addr().Unmap().IsLoopback() {
			return fmt.Errorf("hostguard: %s %s is a loopback address and cannot receive pod traffic redirected by DNAT: list a node-local address (e.g. %s) first", what, ap, example)
		}
	}
	return nil
}

// family is one IP family's view of the config and its programs.
