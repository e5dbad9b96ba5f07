package harness

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// ConflistOptions are the machine-specific parts of a conflist that the demo and the
// e2e point at throwaway places; everything else is kept as shipped in conf/.
type ConflistOptions struct {
	Name       string   // network name
	Bridge     string   // bridge device (in the node netns)
	Subnets    []string // pod subnets for host-local, one range set each (nil: as shipped)
	IPAMDir    string   // host-local dataDir (empty: as shipped)
	StateDir   string   // metaconceal stateDir (empty: as shipped)
	LogFile    string   // metaconceal logFile (empty: as shipped)
	Exclude    []string // metaconceal excludeNamespaces (nil: as shipped)
	CNIVersion string   // override cniVersion (containerd 1.6 speaks up to 1.0.0)
	// Metaconceal are more keys of the metaconceal entry, e.g. {"alts": "reject"}.
	Metaconceal map[string]any
}

// FindExampleConflist returns the first conflist under root (in lexical order) whose
// chain holds bridge, host-local and metaconceal; with wantIPv6, the first whose
// metaconceal entry also lists an IPv6 metadata address.
func FindExampleConflist(root string, wantIPv6 bool) (string, error) {
	var candidates []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".conflist") {
			candidates = append(candidates, p)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("search %s for conflists: %w", root, err)
	}
	sort.Strings(candidates)
	for _, p := range candidates {
		data, err := os.ReadFile(p)
		if err != nil {
			return "", fmt.Errorf("read %s: %w", p, err)
		}
		types := pluginTypes(data)
		if types["bridge"] && types["host-local"] && types["metaconceal"] && (!wantIPv6 || types["ipv6-metadata"]) {
			return p, nil
		}
	}
	what := "bridge + host-local + metaconceal"
	if wantIPv6 {
		what += " with an IPv6 metadata address"
	}
	return "", fmt.Errorf("no conflist with %s under %s (found %d conflists)", what, root, len(candidates))
}

func pluginTypes(data []byte) map[string]bool {
	var list struct {
		Plugins []struct {
			Type string `json:"type"`
			IPAM struct {
				Type string `json:"type"`
			} `json:"ipam"`
			MetadataAddresses []string `json:"metadataAddresses"`
		} `json:"plugins"`
	}
	types := map[string]bool{}
	if json.Unmarshal(data, &list) != nil {
		return types
	}
	for _, p := range list.Plugins {
		types[p.Type] = true
		if p.IPAM.Type != "" {
			types[p.IPAM.Type] = true
		}
		for _, a := range p.MetadataAddresses {
			if p.Type == "metaconceal" && strings.Contains(a, ":") {
				types["ipv6-metadata"] = true
			}
		}
	}
	return types
}

// RewriteConflist applies o to a conflist. The bridge gets no masquerade (a simulated
// node has no uplink, and its nat table should hold only what metaconceal and the
// proxy put there) and, per subnet, a default route, so pods reach the node's
// metadata and proxy addresses through it.
func RewriteConflist(data []byte, o ConflistOptions) ([]byte, error) {
	var list map[string]any
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("decode conflist: %w", err)
	}
	if o.Name != "" {
		list["name"] = o.Name
	}
	if o.CNIVersion != "" {
		list["cniVersion"] = o.CNIVersion
	}
	plugins, ok := list["plugins"].([]any)
	if !ok {
		return nil, fmt.Errorf("conflist has no plugins list")
	}
	sawMetaconceal := false
	for i, raw := range plugins {
		p, ok := raw.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("plugins[%d] is not an object", i)
		}
		switch p["type"] {
		case "bridge":
			if o.Bridge != "" {
				p["bridge"] = o.Bridge
			}
			p["isGateway"] = true
			p["ipMasq"] = false
			ipam, _ := p["ipam"].(map[string]any)
			if ipam == nil {
				ipam = map[string]any{"type": "host-local"}
				p["ipam"] = ipam
			}
			if o.Subnets != nil {
				var ranges, routes []any
				for _, subnet := range o.Subnets {
					ranges = append(ranges, []any{map[string]any{"subnet": subnet}})
					dst := "0.0.0.0/0"
					if strings.Contains(subnet, ":") {
						dst = "::/0"
					}
					routes = append(routes, map[string]any{"dst": dst})
				}
				ipam["ranges"] = ranges
				ipam["routes"] = routes
				delete(ipam, "subnet")
			}
			if o.IPAMDir != "" {
				ipam["dataDir"] = o.IPAMDir
			}
		case "metaconceal":
			sawMetaconceal = true
			if o.StateDir != "" {
				p["stateDir"] = o.StateDir
			}
			if o.LogFile != "" {
				p["logFile"] = o.LogFile
			}
			if o.Exclude != nil {
				p["excludeNamespaces"] = o.Exclude
			}
			for k, v := range o.Metaconceal {
				p[k] = v
			}
		}
	}
	if !sawMetaconceal {
		return nil, fmt.Errorf("conflist chain has no metaconceal plugin")
	}
	return json.MarshalIndent(list, "", "  ")
}
