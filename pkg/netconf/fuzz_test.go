package netconf

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/metaconceal/metaconceal/pkg/redirect"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Whatever the conflist entry says, Parse either rejects it with a code-7 error or
// returns a config whose rules render: no config that passes validation can make ADD
// fail later for a reason validation should have caught.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		`{}`,
		`{"mode":"EXPOSED"}`,
		`{"proxy":"10.0.0.1:8988","metadataAddresses":["169.254.169.254","fd20:ce::254"],"proxy6":"[fd20:ce::252]:988"}`,
		`{"metadataAddresses":["fd20:ce::254"]}`,
		`{"proxy":"[::1]:80"}`,
		`{"metadataAddresses":["::ffff:1.2.3.4"]}`,
		`{"stateDir":"/a/../b","excludeNamespaces":["x"],"iptablesBackend":"legacy"}`,
		`{"alts":"reject"}`,
		`{"alts":"relay","altsRelay":"10.0.0.2:987","proxy6":"[fd20:ce::252]:988","altsRelay6":"[fd00::2]:987"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := Parse(data)
		if err != nil {
			var cniErr *types.Error
			if !errors.As(err, &cniErr) || cniErr.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("rejection %v is not a code-7 CNI error", err)
			}
			return
		}
		switch conf.Mode {
		case ModeSecure, ModeExposed, ModeUnspecified:
		default:
			t.Fatalf("accepted mode %q", conf.Mode)
		}
		if !filepath.IsAbs(conf.StateDir) || !conf.ProxyAddr.Addr().Is4() || conf.ProxyAddr.Addr().IsLoopback() {
			t.Fatalf("accepted stateDir %q proxy %v", conf.StateDir, conf.ProxyAddr)
		}
		if len(conf.Metadata4)+len(conf.Metadata6) == 0 {
			t.Fatalf("accepted a config with no metadata address")
		}
		if _, err := xtables.Names(conf.IptablesBackend, xtables.IPv4); err != nil || conf.IptablesBackend == "" {
			t.Fatalf("accepted iptablesBackend %q: %v", conf.IptablesBackend, err)
		}
		att := redirect.Attachment{ContainerID: "c", IfName: "eth0"}
		if len(conf.Metadata4) > 0 {
			if _, err := redirect.Render(redirect.Spec{Family: xtables.IPv4, Attachment: att, Metadata: conf.Metadata4, Proxy: conf.ProxyAddr, ALTS: conf.ALTSAddr}); err != nil {
				t.Fatalf("accepted config does not render for IPv4: %v", err)
			}
		}
		if len(conf.Metadata6) > 0 {
			if _, err := redirect.Render(redirect.Spec{Family: xtables.IPv6, Attachment: att, Metadata: conf.Metadata6, Proxy: conf.Proxy6Addr, ALTS: conf.ALTS6Addr}); err != nil {
				t.Fatalf("accepted config does not render for IPv6: %v", err)
			}
		}
	})
}
