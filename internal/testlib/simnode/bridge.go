package simnode

import (
	"context"
	"fmt"
	"net/netip"
)

// AddBridge creates a bridge in the node netns, as the bridge CNI plugin makes cni0:
// gw (CIDR form, e.g. 10.89.0.1/24) on it, up. Close removes it with the node.
func (n *Node) AddBridge(name, gw string) error {
	for _, args := range [][]string{
		{"-n", n.Name, "link", "add", name, "type", "bridge"},
		{"-n", n.Name, "addr", "add", gw, "dev", name},
		{"-n", n.Name, "link", "set", name, "up"},
	} {
		if _, err := Run(context.Background(), "ip", args...); err != nil {
			return err
		}
	}
	return nil
}

// AddBridgedPod creates a pod netns (NewPodNS) joined to the node's bridge by a veth,
// as the bridge CNI plugin does: hostIf in the node netns as a port of bridge, eth0 in
// the pod with addr (CIDR form, e.g. 10.89.0.2/24) and a default route via gw (the
// bridge's address). It returns the pod netns's name and path; Close deletes it.
func (n *Node) AddBridgedPod(prefix, bridge, hostIf, addr string, gw netip.Addr) (name, path string, err error) {
	return n.addVethPod(prefix, hostIf, addr, gw, []string{"link", "set", hostIf, "master", bridge})
}

// AddRoutedPod creates a pod netns (NewPodNS) joined to the node by a veth of its own,
// as the ptp CNI plugin (or Calico) does: hostIf in the node netns with gw (CIDR form,
// e.g. 10.252.1.1/24), eth0 in the pod with addr (CIDR form) and a default route via
// gw's address. It returns the pod netns's name and path; Close deletes it.
func (n *Node) AddRoutedPod(prefix, hostIf, gw, addr string) (name, path string, err error) {
	gwPrefix, err := netip.ParsePrefix(gw)
	if err != nil {
		return "", "", fmt.Errorf("simnode: gateway address %q: %w", gw, err)
	}
	return n.addVethPod(prefix, hostIf, addr, gwPrefix.Addr(), []string{"addr", "add", gw, "dev", hostIf})
}

// addVethPod makes the pod netns and its veth; hostSetup is the one `ip` command (in
// the node netns) that joins hostIf to the node before it is brought up.
func (n *Node) addVethPod(prefix, hostIf, addr string, gw netip.Addr, hostSetup []string) (name, path string, err error) {
	if _, err := netip.ParsePrefix(addr); err != nil {
		return "", "", fmt.Errorf("simnode: pod address %q: %w", addr, err)
	}
	name, path, err = n.NewPodNS(prefix)
	if err != nil {
		return "", "", err
	}
	for _, args := range [][]string{
		{"-n", n.Name, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", name},
		append([]string{"-n", n.Name}, hostSetup...),
		{"-n", n.Name, "link", "set", hostIf, "up"},
		{"-n", name, "addr", "add", addr, "dev", "eth0"},
		{"-n", name, "link", "set", "eth0", "up"},
		{"-n", name, "route", "add", "default", "via", gw.String()},
	} {
		if _, err := Run(context.Background(), "ip", args...); err != nil {
			return "", "", err
		}
	}
	return name, path, nil
}
