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

// Settings are the proxy's command-line settings the guard is derived from.
type Settings struct {
	// Listen are the proxy's --listen values (IP:port).
	Listen []string
	// ALTSListen are the ALTS relay's --alts-listen values (IP:port); none means the
	// relay is off and the guard rejects the ALTS port instead of redirecting it.
	ALTSListen []string
	// Upstream is the real metadata server (--upstream): its host, when an IP, is the
	// address pods try to reach, and its port the port.
	Upstream *url.URL
	// MetadataAddrs are explicit --metadata-addr values; they replace the defaults.
	MetadataAddrs []string
	// Backend is --iptables-backend: "auto" (iptables on PATH), "nft" or "legacy";
	// empty means "auto" (xtables.ParseBackend).
	Backend string
	// ConnRate and ConnBurst are --guard-conn-rate and --guard-conn-burst: new TCP
	// connections per second and burst per source IP to the listen addresses (0
	// rate: no limit; see ChainLimit).
	ConnRate, ConnBurst int
	// IPv6 says whether the node has an IPv6 stack (IPv6Enabled on a real node). With
	// it, GCE's IPv6 metadata address is guarded too by default.
	IPv6 bool
}

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
	var cfg Config
	backend, err := xtables.ParseBackend(s.Backend)
	if err != nil {
		return cfg, fmt.Errorf("--iptables-backend: %w", err)
	}
	cfg.Backend = backend
	if len(s.Listen) == 0 {
		return cfg, errors.New("hostguard: no --listen address to redirect to")
	}
	for _, l := range s.Listen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil {
			return cfg, fmt.Errorf("--listen %q: the host guard needs an IP:port: %w", l, err)
		}
		cfg.ListenAddrs = append(cfg.ListenAddrs, ap)
	}
	for _, l := range s.ALTSListen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil {
			return cfg, fmt.Errorf("--alts-listen %q: the host guard needs an IP:port: %w", l, err)
		}
		cfg.ALTSListenAddrs = append(cfg.ALTSListenAddrs, ap)
	}
	for _, a := range s.MetadataAddrs {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return cfg, fmt.Errorf("--metadata-addr %q: %w", a, err)
		}
		cfg.MetadataAddrs = append(cfg.MetadataAddrs, ip)
	}
	if s.ConnRate < 0 || s.ConnRate > maxConnRate {
		return cfg, fmt.Errorf("--guard-conn-rate %d: want 0 (off) to %d", s.ConnRate, maxConnRate)
	}
	if s.ConnRate > 0 && (s.ConnBurst < 1 || s.ConnBurst > maxConnBurst) {
		return cfg, fmt.Errorf("--guard-conn-burst %d: want 1-%d when --guard-conn-rate is set", s.ConnBurst, maxConnBurst)
	}
	if s.ConnRate > 0 {
		cfg.ConnRate, cfg.ConnBurst = uint32(s.ConnRate), uint32(s.ConnBurst)
	}
	if s.Upstream == nil {
		return cfg, errors.New("hostguard: no upstream to derive the metadata address and port from")
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
			return cfg, fmt.Errorf("--upstream port %q: want 1-65535", p)
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
