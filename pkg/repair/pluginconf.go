package repair

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/skel"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/metaconceal/metaconceal/pkg/conflist"
	"github.com/metaconceal/metaconceal/pkg/netconf"
)

// ErrNoEntry says the node's primary CNI config holds no metaconceal entry.
var ErrNoEntry = errors.New("no metaconceal entry in the primary CNI config")

// PluginConf is the metaconceal entry of the node's primary CNI config, as the
// runtime hands it to the plugin.
type PluginConf struct {
	Path       string // the config file
	Network    string // the conflist's name
	CNIVersion string
	entry      map[string]any  // the entry's own keys, as written
	Conf       *netconf.Config // parsed by the plugin's own parser
}

// LoadPluginConf reads the primary CNI config of confDir (the file the runtime uses)
// and returns its metaconceal entry; ErrNoEntry (wrapped) when there is none.
func LoadPluginConf(confDir string) (*PluginConf, error) {
	path, err := conflist.Primary(confDir)
	if err != nil {
		return nil, err
	}
	list, err := libcni.ConfListFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("repair: read CNI config %s: %w", path, err)
	}
	for _, p := range list.Plugins {
		if p.Network == nil || p.Network.Type != conflist.PluginType {
			continue
		}
		var entry map[string]any
		if err := json.Unmarshal(p.Bytes, &entry); err != nil {
			return nil, fmt.Errorf("repair: decode the metaconceal entry of %s: %w", path, err)
		}
		pc := &PluginConf{Path: path, Network: list.Name, CNIVersion: list.CNIVersion, entry: entry}
		// Parse what the plugin would receive, with an empty prevResult, to learn the
		// state dir, mode and exclusions exactly as the plugin reads them.
		stdin, err := pc.Stdin(nil, "", "", "")
		if err != nil {
			return nil, err
		}
		if pc.Conf, err = netconf.Parse(stdin); err != nil {
			return nil, fmt.Errorf("repair: the metaconceal entry of %s: %w", path, err)
		}
		return pc, nil
	}
	return nil, fmt.Errorf("repair: %s: %w", path, ErrNoEntry)
}

// Stdin is the plugin's stdin for an ADD, as libcni builds it for a chained plugin: the
// entry, the network's name and cniVersion, and the previous plugin's result. The
// result holds what the plugin reads of it: the pod's IPs and, when known, the
// host-side interface (hostIf) and the pod's interface (ifName in netns).
func (pc *PluginConf) Stdin(ips []string, hostIf, ifName, netns string) ([]byte, error) {
	res := &current.Result{CNIVersion: current.ImplementedSpecVersion}
	var podIf *int
	if ifName != "" {
		if hostIf != "" {
			res.Interfaces = append(res.Interfaces, &current.Interface{Name: hostIf})
		}
		res.Interfaces = append(res.Interfaces, &current.Interface{Name: ifName, Sandbox: netns})
		i := len(res.Interfaces) - 1
		podIf = &i
	}
	for _, s := range ips {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("repair: pod IP %q: %w", s, err)
		}
		a = a.Unmap()
		ipn := net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
		res.IPs = append(res.IPs, &current.IPConfig{Address: ipn, Interface: podIf})
	}
	prev, err := res.GetAsVersion(pc.CNIVersion)
	if err != nil {
		return nil, fmt.Errorf("repair: express the pod's IPs as a cniVersion %s result: %w", pc.CNIVersion, err)
	}
	prevJSON, err := json.Marshal(prev)
	if err != nil {
		return nil, fmt.Errorf("repair: encode prevResult: %w", err)
	}
	conf := make(map[string]any, len(pc.entry)+3)
	for k, v := range pc.entry {
		conf[k] = v
	}
	conf["name"], conf["cniVersion"], conf["prevResult"] = pc.Network, pc.CNIVersion, json.RawMessage(prevJSON)
	return json.Marshal(conf)
}

// DefaultIfName is the interface name containerd and CRI-O give a pod's only network.
const DefaultIfName = "eth0"

// AddArgs are the CNI arguments of an ADD for sb, as containerd passes them: the
// sandbox id as container id, its netns, and the pod's identity in CNI_ARGS; hostIf is
// the pod's host-side interface ("" when unknown).
func (pc *PluginConf) AddArgs(sb Sandbox, ifName, hostIf string) (*skel.CmdArgs, error) {
	for _, v := range []string{sb.Namespace, sb.Name, sb.UID} {
		if strings.ContainsAny(v, ";=") {
			return nil, fmt.Errorf("repair: sandbox %s: metadata %q cannot be passed in CNI_ARGS", sb, v)
		}
	}
	stdin, err := pc.Stdin(sb.IPs, hostIf, ifName, sb.Netns)
	if err != nil {
		return nil, err
	}
	return &skel.CmdArgs{
		ContainerID: sb.ID,
		Netns:       sb.Netns,
		IfName:      ifName,
		Args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + sb.Namespace + ";K8S_POD_NAME=" + sb.Name +
			";K8S_POD_INFRA_CONTAINER_ID=" + sb.ID + ";K8S_POD_UID=" + sb.UID,
		StdinData: stdin,
	}, nil
}
