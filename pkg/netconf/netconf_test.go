package netconf

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

func TestParseDefaults(t *testing.T) {
	t.Parallel()
	conf, err := Parse([]byte(`{"cniVersion":"1.1.0","name":"net","type":"metaconceal"}`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if conf.Mode != ModeSecure || !conf.Mode.Conceals() {
		t.Errorf("mode = %q, want SECURE", conf.Mode)
	}
	if got, want := conf.ProxyAddr, netip.MustParseAddrPort("169.254.169.252:988"); got != want {
		t.Errorf("proxy = %v, want %v", got, want)
	}
	if conf.Proxy6Addr.IsValid() {
		t.Errorf("proxy6 = %v, want unset", conf.Proxy6Addr)
	}
	if want := []netip.Addr{netip.MustParseAddr("169.254.169.254")}; !slices.Equal(conf.Metadata4, want) || len(conf.Metadata6) != 0 {
		t.Errorf("metadata = %v / %v, want %v / none", conf.Metadata4, conf.Metadata6, want)
	}
	if conf.StateDir != "/run/metaconceal" {
		t.Errorf("stateDir = %q", conf.StateDir)
	}
	if conf.IptablesBackend != xtables.BackendAuto {
		t.Errorf("iptablesBackend = %q", conf.IptablesBackend)
	}
	if conf.ALTS != ALTSRelay || conf.ALTSAddr != netip.MustParseAddrPort("169.254.169.252:987") || conf.ALTS6Addr.IsValid() {
		t.Errorf("alts = %q %v %v, want relay to 169.254.169.252:987 and no IPv6 relay", conf.ALTS, conf.ALTSAddr, conf.ALTS6Addr)
	}
	if conf.Name != "net" || conf.CNIVersion != "1.1.0" {
		t.Errorf("embedded NetConf not decoded: %+v", conf.NetConf)
	}
}

func TestParseFull(t *testing.T) {
	t.Parallel()
	conf, err := Parse([]byte(`{
		"cniVersion": "0.4.0", "name": "net", "type": "metaconceal",
		"mode": "EXPOSED", "proxy": "10.0.0.1:8988", "proxy6": "[fd20:ce::252]:988",
		"metadataAddresses": ["169.254.169.254", "fd20:ce::254", "10.9.9.9"],
		"stateDir": "/var/run/mc/../mc2", "excludeNamespaces": ["kube-system"],
		"logFile": "/var/log/mc.log", "iptablesBackend": "legacy"}`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if conf.Mode.Conceals() {
		t.Errorf("EXPOSED conceals")
	}
	if conf.ProxyAddr.String() != "10.0.0.1:8988" || conf.Proxy6Addr.String() != "[fd20:ce::252]:988" {
		t.Errorf("proxies = %v %v", conf.ProxyAddr, conf.Proxy6Addr)
	}
	if len(conf.Metadata4) != 2 || len(conf.Metadata6) != 1 || conf.Metadata6[0] != netip.MustParseAddr("fd20:ce::254") {
		t.Errorf("metadata split wrong: %v %v", conf.Metadata4, conf.Metadata6)
	}
	if conf.StateDir != "/var/run/mc2" {
		t.Errorf("stateDir not cleaned: %q", conf.StateDir)
	}
	if !conf.Excluded("kube-system") || conf.Excluded("default") || conf.Excluded("") {
		t.Errorf("Excluded wrong")
	}
	if conf.IptablesBackend != xtables.BackendLegacy || conf.LogFile != "/var/log/mc.log" {
		t.Errorf("backend/logFile = %q %q", conf.IptablesBackend, conf.LogFile)
	}
}

func TestParseModes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		mode     string
		conceals bool
	}{{"SECURE", true}, {"EXPOSED", false}, {"UNSPECIFIED", false}} {
		conf, err := Parse([]byte(`{"cniVersion":"1.0.0","mode":"` + tc.mode + `"}`))
		if err != nil {
			t.Fatalf("mode %s: %v", tc.mode, err)
		}
		if conf.Mode.Conceals() != tc.conceals {
			t.Errorf("mode %s conceals = %v", tc.mode, !tc.conceals)
		}
	}
}

// "alts" chooses the treatment of port 8080; the relay defaults to the proxy's address
// with port 987 in each family that has a proxy.
func TestParseALTS(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		conf          string
		alts          ALTS
		relay, relay6 string
	}{
		{`{}`, ALTSRelay, "169.254.169.252:987", ""},
		{`{"alts":"relay"}`, ALTSRelay, "169.254.169.252:987", ""},
		{`{"alts":"reject"}`, ALTSReject, "", ""},
		{`{"alts":"reject","proxy6":"[fd20:ce::252]:988"}`, ALTSReject, "", ""},
		{`{"proxy":"10.0.0.1:8988","proxy6":"[fd20:ce::252]:988"}`, ALTSRelay, "10.0.0.1:987", "[fd20:ce::252]:987"},
		{`{"altsRelay":"10.0.0.2:1987","altsRelay6":"[fd00::2]:1987"}`, ALTSRelay, "10.0.0.2:1987", "[fd00::2]:1987"},
	} {
		conf, err := Parse([]byte(tc.conf))
		if err != nil {
			t.Fatalf("Parse(%s): %v", tc.conf, err)
		}
		str := func(a netip.AddrPort) string {
			if !a.IsValid() {
				return ""
			}
			return a.String()
		}
		if conf.ALTS != tc.alts || str(conf.ALTSAddr) != tc.relay || str(conf.ALTS6Addr) != tc.relay6 {
			t.Errorf("Parse(%s): alts %q relay %q relay6 %q, want %q %q %q", tc.conf, conf.ALTS, str(conf.ALTSAddr), str(conf.ALTS6Addr), tc.alts, tc.relay, tc.relay6)
		}
	}
}

// Every bad value is a code-7 error whose message names the key and the value.
func TestParseErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, conf string
		mention    []string
	}{
		{"not json", `{`, []string{"cannot decode"}},
		{"mode type", `{"mode": 3}`, []string{"mode"}},
		{"unknown mode", `{"mode":"secure"}`, []string{`"mode"`, `"secure"`}},
		{"proxy no port", `{"proxy":"169.254.169.252"}`, []string{`"proxy"`, `"169.254.169.252"`}},
		{"proxy hostname", `{"proxy":"metadata:988"}`, []string{`"proxy"`, `"metadata:988"`}},
		{"proxy ipv6", `{"proxy":"[fd00::1]:988"}`, []string{`"proxy"`, `"[fd00::1]:988"`, "proxy6"}},
		{"proxy port 0", `{"proxy":"10.0.0.1:0"}`, []string{`"proxy"`, "port 0"}},
		{"proxy loopback", `{"proxy":"127.0.0.1:988"}`, []string{`"proxy"`, "loopback"}},
		{"proxy unspecified", `{"proxy":"0.0.0.0:988"}`, []string{`"proxy"`, "unicast"}},
		{"proxy6 ipv4", `{"proxy6":"10.0.0.1:988"}`, []string{`"proxy6"`, `"10.0.0.1:988"`}},
		{"proxy6 mapped", `{"proxy6":"[::ffff:10.0.0.1]:988"}`, []string{`"proxy6"`}},
		{"proxy6 zone", `{"proxy6":"[fe80::1%eth0]:988"}`, []string{`"proxy6"`, "zone"}},
		{"metadata not ip", `{"metadataAddresses":["metadata.google.internal"]}`, []string{`"metadataAddresses"`, `"metadata.google.internal"`}},
		{"metadata cidr", `{"metadataAddresses":["169.254.169.254/32"]}`, []string{`"metadataAddresses"`, `"169.254.169.254/32"`}},
		{"metadata empty list", `{"metadataAddresses":[]}`, []string{`"metadataAddresses"`, "EXPOSED"}},
		{"metadata duplicate", `{"metadataAddresses":["169.254.169.254","169.254.169.254"]}`, []string{`"metadataAddresses"`, "twice"}},
		{"metadata mapped", `{"metadataAddresses":["::ffff:169.254.169.254"]}`, []string{`"metadataAddresses"`, "IPv4-mapped"}},
		{"metadata zone", `{"metadataAddresses":["fe80::1%eth0"]}`, []string{`"metadataAddresses"`, "zone"}},
		{"metadata unspecified", `{"metadataAddresses":["0.0.0.0"]}`, []string{`"metadataAddresses"`, `"0.0.0.0"`}},
		{"metadata is proxy", `{"metadataAddresses":["169.254.169.252"]}`, []string{`"metadataAddresses"`, "proxy"}},
		{"metadata is proxy6", `{"proxy6":"[fd20:ce::254]:988","metadataAddresses":["fd20:ce::254"]}`, []string{`"metadataAddresses"`, "proxy"}},
		{"stateDir relative", `{"stateDir":"run/mc"}`, []string{`"stateDir"`, `"run/mc"`}},
		{"logFile relative", `{"logFile":"mc.log"}`, []string{`"logFile"`, `"mc.log"`}},
		{"exclude empty", `{"excludeNamespaces":[""]}`, []string{`"excludeNamespaces"`}},
		{"exclude padded", `{"excludeNamespaces":[" kube-system"]}`, []string{`"excludeNamespaces"`, `" kube-system"`}},
		{"backend", `{"iptablesBackend":"ebpf"}`, []string{`"iptablesBackend"`, `"ebpf"`}},
		{"alts unknown", `{"alts":"RELAY"}`, []string{`"alts"`, `"RELAY"`, "reject"}},
		{"alts relay with reject", `{"alts":"reject","altsRelay":"10.0.0.1:987"}`, []string{`"altsRelay"`, "reject"}},
		{"altsRelay no port", `{"altsRelay":"10.0.0.1"}`, []string{`"altsRelay"`, `"10.0.0.1"`}},
		{"altsRelay loopback", `{"altsRelay":"127.0.0.1:987"}`, []string{`"altsRelay"`, "loopback"}},
		{"altsRelay6 ipv4", `{"altsRelay6":"10.0.0.1:987"}`, []string{`"altsRelay6"`}},
		{"metadata is alts relay", `{"altsRelay":"169.254.169.254:987"}`, []string{`"metadataAddresses"`, "ALTS relay"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse([]byte(tc.conf))
			if err == nil {
				t.Fatalf("Parse(%s) succeeded, want an error", tc.conf)
			}
			var cniErr *types.Error
			if !errors.As(err, &cniErr) || cniErr.Code != types.ErrInvalidNetworkConfig {
				t.Fatalf("error %v (%T) is not a CNI error with code %d", err, err, types.ErrInvalidNetworkConfig)
			}
			for _, m := range tc.mention {
				if !strings.Contains(cniErr.Msg, m) {
					t.Errorf("message %q does not mention %s", cniErr.Msg, m)
				}
			}
		})
	}
}

// Every backend pkg/xtables knows is accepted under its own name; empty is the
// default, auto, as for the proxy's --iptables-backend.
func TestParseBackends(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]xtables.Backend{`""`: xtables.BackendAuto, `"auto"`: xtables.BackendAuto, `"nft"`: xtables.BackendNFT, `"legacy"`: xtables.BackendLegacy} {
		conf, err := Parse([]byte(`{"cniVersion":"1.1.0","name":"n","type":"metaconceal","iptablesBackend":` + in + `}`))
		if err != nil {
			t.Errorf("iptablesBackend %s: %v", in, err)
		} else if conf.IptablesBackend != want {
			t.Errorf("iptablesBackend %s: got %q, want %q", in, conf.IptablesBackend, want)
		}
	}
}

func TestParsePodArgs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want PodArgs
	}{
		{"", PodArgs{}},
		{"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
			PodArgs{Namespace: "ns", Name: "web-0", UID: "u-1"}},
		{"K8S_POD_NAMESPACE=ns;garbage;=x;K8S_POD_NAME=", PodArgs{Namespace: "ns"}},
		{"K8S_POD_UID=a=b", PodArgs{UID: "a=b"}},
	} {
		if got := ParsePodArgs(tc.in); got != tc.want {
			t.Errorf("ParsePodArgs(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
