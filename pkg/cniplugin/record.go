package cniplugin

import (
	"github.com/containernetworking/cni/pkg/skel"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/pkg/netconf"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// record builds the state record of an attachment, the one place the plugin does:
// ADD writes it, CHECK compares what is stored against it. It runs in the node netns,
// where the host-side interface is looked up.
func record(conf *netconf.Config, args *skel.CmdArgs, pod netconf.PodArgs, prev *current.Result) state.Record {
	att := state.Attachment{
		Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName, Netns: args.Netns,
		HostIf: hostInterface(prev),
	}
	ref := state.PodRef{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
	return state.NewRecord(att, ref, podIPs(prev), exposedReason(conf, pod))
}

// hostInterface returns the attachment's host-side interface from the main plugin's
// result: the one interface without a sandbox that is a veth in the current (node)
// netns. The bridge plugin lists the bridge, the host veth and the pod's interface;
// ptp lists the host veth and the pod's interface. Anything else (no such interface,
// several, a result that names none) gives "": the proxy then serves an exposed pod
// as concealed under the host guard, since its IP could be spoofed (fail closed).
func hostInterface(prev *current.Result) string {
	var h *netlink.Handle // one netlink socket for every lookup, opened when needed
	defer func() {
		if h != nil {
			h.Close()
		}
	}()
	found := ""
	for _, iface := range prev.Interfaces {
		if iface == nil || iface.Sandbox != "" || iface.Name == "" {
			continue
		}
		if h == nil {
			var err error
			if h, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
				return ""
			}
		}
		link, err := h.LinkByName(iface.Name)
		if err != nil || link.Type() != "veth" {
			continue
		}
		if found != "" && found != iface.Name {
			return "" // ambiguous
		}
		found = iface.Name
	}
	return found
}
