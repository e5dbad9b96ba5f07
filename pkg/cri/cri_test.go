package cri

import (
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestFromStatus(t *testing.T) {
	t.Parallel()
	md := &runtimeapi.PodSandboxMetadata{Name: "web", Namespace: "shop", Uid: "u-1"}
	spec := `{"pid":42,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}}`
	cases := []struct {
		name    string
		st      *runtimeapi.PodSandboxStatus
		info    map[string]string
		netns   string
		ips     []string
		host    bool
		wantErr string
	}{
		{"pod network", &runtimeapi.PodSandboxStatus{Id: "s1", Metadata: md, State: runtimeapi.PodSandboxState_SANDBOX_READY,
			Network: &runtimeapi.PodSandboxNetworkStatus{Ip: "10.0.0.5", AdditionalIps: []*runtimeapi.PodIP{{Ip: "fd00::5"}}}},
			map[string]string{"info": spec}, "/var/run/netns/cni-1234", []string{"10.0.0.5", "fd00::5"}, false, ""},
		{"netNamespacePath wins", &runtimeapi.PodSandboxStatus{Id: "s1", Metadata: md, State: runtimeapi.PodSandboxState_SANDBOX_READY},
			map[string]string{"info": `{"netNamespacePath":"/run/netns/x","runtimeSpec":{}}`}, "/run/netns/x", nil, false, ""},
		{"hostNetwork needs no netns", &runtimeapi.PodSandboxStatus{Id: "s2", Metadata: md, State: runtimeapi.PodSandboxState_SANDBOX_READY,
			Linux: &runtimeapi.LinuxPodSandboxStatus{Namespaces: &runtimeapi.Namespace{Options: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE}}}},
			nil, "", nil, true, ""},
		{"no verbose info", &runtimeapi.PodSandboxStatus{Id: "s3", Metadata: md}, nil, "", nil, false, "no info"},
		{"garbage info", &runtimeapi.PodSandboxStatus{Id: "s3", Metadata: md}, map[string]string{"info": "{"}, "", nil, false, "decode"},
		{"no network namespace", &runtimeapi.PodSandboxStatus{Id: "s3", Metadata: md}, map[string]string{"info": `{"runtimeSpec":{"linux":{"namespaces":[{"type":"network"}]}}}`}, "", nil, false, "names no network namespace"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			sb, err := FromStatus(c.st, c.info)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err %v, want one with %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if sb.Netns != c.netns || sb.HostNetwork != c.host || strings.Join(sb.IPs, ",") != strings.Join(c.ips, ",") ||
				sb.Namespace != "shop" || sb.Name != "web" || sb.UID != "u-1" {
				t.Errorf("FromStatus = %+v", sb)
			}
		})
	}
}
