package cniplugin

import (
	"context"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// TestHostInterface builds, in a node netns of its own, what the bridge plugin leaves
// behind (a bridge, a host veth enslaved to it, the pod end elsewhere) and checks that
// the host veth is the interface recorded, and that anything ambiguous records none.
func TestHostInterface(t *testing.T) {
	testutil.RequirePrivileged(t, "ip")
	t.Parallel()
	node, err := simnode.New("mc-hostif")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	ctx := context.Background()
	for _, args := range [][]string{
		{"link", "add", "mcbr0", "type", "bridge"},
		{"link", "add", "vethaa", "type", "veth", "peer", "name", "podaa"},
		{"link", "set", "vethaa", "master", "mcbr0"},
		{"link", "add", "vethbb", "type", "veth", "peer", "name", "podbb"},
	} {
		if _, err := simnode.Run(ctx, "ip", append([]string{"-n", node.Name}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	ifs := func(names ...string) *current.Result {
		res := &current.Result{}
		for _, n := range names {
			res.Interfaces = append(res.Interfaces, &current.Interface{Name: n})
		}
		res.Interfaces = append(res.Interfaces, &current.Interface{Name: "eth0", Sandbox: "/var/run/netns/pod"})
		return res
	}
	for _, tc := range []struct {
		name string
		res  *current.Result
		want string
	}{
		{"bridge plugin", ifs("mcbr0", "vethaa"), "vethaa"},
		{"ptp", ifs("vethbb"), "vethbb"},
		{"same veth twice", ifs("vethaa", "vethaa"), "vethaa"},
		{"two veths", ifs("mcbr0", "vethaa", "vethbb"), ""},
		{"bridge only", ifs("mcbr0"), ""},
		{"not in this netns", ifs("mcbr0", "vethzz"), ""},
		{"only the pod's end", ifs(), ""},
	} {
		var got string
		if err := simnode.In(node.Path, func() error { got = hostInterface(tc.res); return nil }); err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%s: hostInterface = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// BenchmarkHostInterface measures what recording the host interface adds to ADD and
// CHECK: netlink lookups of the bridge plugin's two sandbox-less interfaces.
func BenchmarkHostInterface(b *testing.B) {
	testutil.RequirePrivileged(b, "ip")
	node, err := simnode.New("mc-hostif")
	if err != nil {
		b.Fatal(err)
	}
	defer node.Close()
	for _, args := range [][]string{
		{"link", "add", "mcbr0", "type", "bridge"},
		{"link", "add", "vethaa", "type", "veth", "peer", "name", "podaa"},
		{"link", "set", "vethaa", "master", "mcbr0"},
	} {
		if _, err := simnode.Run(context.Background(), "ip", append([]string{"-n", node.Name}, args...)...); err != nil {
			b.Fatal(err)
		}
	}
	res := &current.Result{Interfaces: []*current.Interface{{Name: "mcbr0"}, {Name: "vethaa"}, {Name: "eth0", Sandbox: "/x"}}}
	err = simnode.In(node.Path, func() error {
		b.ResetTimer()
		for b.Loop() {
			if hostInterface(res) != "vethaa" {
				b.Fatal("wrong interface")
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
