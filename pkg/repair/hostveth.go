package repair

import (
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// HostVeth returns the name, in the current (node) netns, of the veth peer of ifName
// in the pod netns at netnsPath: the host-side interface the main plugin made.
func HostVeth(netnsPath, ifName string) (string, error) {
	peer := 0
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", ifName, err)
		}
		if link.Type() != "veth" {
			return fmt.Errorf("pod interface %s is a %s, not a veth", ifName, link.Type())
		}
		peer = link.Attrs().ParentIndex
		return nil
	})
	if err != nil {
		return "", err
	}
	if peer == 0 {
		return "", fmt.Errorf("pod interface %s names no peer", ifName)
	}
	host, err := netlink.LinkByIndex(peer)
	if err != nil {
		return "", fmt.Errorf("host-side peer (index %d) of %s: %w", peer, ifName, err)
	}
	if host.Type() != "veth" {
		return "", fmt.Errorf("host-side peer %s of %s is a %s, not a veth", host.Attrs().Name, ifName, host.Type())
	}
	return host.Attrs().Name, nil
}
