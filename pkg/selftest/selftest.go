// Package selftest proves, from inside a running pod's network namespace, that the
// node's host guard stands between the pod and the metadata server on this node's
// datapath: it sends a hand-made TCP connection to the metadata address, port 80, on
// an AF_PACKET socket of the pod's interface (pkg/rawtcp), as a pod holding CAP_NET_RAW
// would, so the pod's own iptables rules never see it, and decides from the answer's
// head whether it reached the proxy or the metadata server (see protocol.go). The
// request is for a path only the proxy answers, and only the status line of any answer
// is kept: no concealed value is ever read.
//
// The probe uses the pod's own address as source: on a bridge any free address of the
// subnet would do, but on routed datapaths (ptp, as GKE's classic datapath; Calico;
// Cilium) the node routes only the pod's /32 back to its veth, and their anti-spoofing
// drops other sources. The pod's kernel, which knows nothing of the connection, would
// reset it when the answer arrives; while the probe runs, one rule at the top of the
// pod netns's filter OUTPUT drops the resets of the probe's connection only (its source
// port is outside the kernel's ephemeral range), and is deleted afterwards.
package selftest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/rawtcp"
	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Defaults of Config fields left zero.
const (
	DefaultIfName  = "eth0"
	DefaultTimeout = 5 * time.Second
)

// ruleComment marks the probe's transient rule in the pod netns.
const ruleComment = "metaconceal selftest: drop the kernel's resets of the probe"

// Config is one probe.
type Config struct {
	// Netns is the pod's network namespace (a path, as in a state record).
	Netns string
	// IfName is the pod's interface (DefaultIfName when empty).
	IfName string
	// Backend runs the transient rule in the pod netns (BackendAuto when empty).
	Backend xtables.Backend
	// Proxy, when valid, is asked for the self-test path first: a proxy that does not
	// answer it (not running, or a release without the self-test) would make every
	// probe look bypassed. The connection is made in ProxyNetns.
	Proxy netip.AddrPort
	// ProxyNetns is the netns (a path) the proxy is asked from: the node's. Empty
	// means the process's own netns (the node agent is hostNetwork); not the calling
	// thread's, whatever it is: net/http dials on goroutines of its own.
	ProxyNetns string
	// Target is what the probe connects to (the metadata address, port 80, when zero).
	Target netip.AddrPort
	// Timeout bounds the probe (DefaultTimeout when zero); a dropped probe takes it all.
	Timeout time.Duration
}

// Result is what one probe found. It holds no part of any answer but its status line.
type Result struct {
	Verdict Verdict
	// Status is the answer's status line ("" when nothing answered).
	Status string
	// Detail says how the probe ended when nothing answered.
	Detail string
	Src    netip.Addr
	IfName string
	Took   time.Duration
}

func (c *Config) defaults() error {
	if c.Netns == "" {
		return errors.New("selftest: no pod netns")
	}
	if c.IfName == "" {
		c.IfName = DefaultIfName
	}
	if c.Backend == "" {
		c.Backend = xtables.BackendAuto
	}
	if err := c.Backend.Validate(); err != nil {
		return fmt.Errorf("selftest: %w", err)
	}
	if !c.Target.IsValid() {
		c.Target = netip.AddrPortFrom(gce.MetadataIPv4, gce.MetadataPort)
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	return nil
}

// Run probes once. An error means the probe could not be made (nothing decided).
func Run(ctx context.Context, cfg Config) (Result, error) {
	if err := cfg.defaults(); err != nil {
		return Result{}, err
	}
	start := time.Now()
	nonce, err := NewNonce()
	if err != nil {
		return Result{}, err
	}
	if cfg.Proxy.IsValid() {
		if err := ProxyAnswers(ctx, cfg.ProxyNetns, cfg.Proxy, nonce, cfg.Timeout); err != nil {
			return Result{}, err
		}
	}
	res := Result{IfName: cfg.IfName}
	err = ns.WithNetNSPath(cfg.Netns, func(ns.NetNS) error {
		// ns runs this on a locked thread in the pod netns: the iptables processes and
		// the AF_PACKET socket are made here; nothing here may move to another goroutine.
		client, err := route(cfg.IfName, cfg.Target)
		if err != nil {
			return err
		}
		res.Src = client.Src
		if _, err := client.PickSourcePort(); err != nil {
			return err
		}
		undo, err := dropResets(cfg.Backend, client)
		if err != nil {
			return err
		}
		client.Enough = enough
		raw, xerr := client.Exchange(Request(nonce), cfg.Timeout)
		if err := undo(); err != nil {
			return errors.Join(xerr, err)
		}
		if v, status, ok := classify(raw, nonce); ok {
			res.Verdict, res.Status = v, status
			return nil
		}
		clear(raw) // not an HTTP head: nothing of it is kept
		switch {
		case errors.Is(xerr, rawtcp.ErrDropped), errors.Is(xerr, rawtcp.ErrReset):
			res.Verdict, res.Detail = Blocked, xerr.Error()
			return nil
		case xerr != nil:
			return xerr
		default:
			return errors.New("selftest: the answer was not HTTP")
		}
	})
	res.Took = time.Since(start)
	if err != nil {
		return Result{}, fmt.Errorf("selftest in %s: %w", cfg.Netns, err)
	}
	return res, nil
}

// route finds, in the current netns, how the pod reaches target: the next hop and the
// source address its kernel would use, on ifName.
func route(ifName string, target netip.AddrPort) (*rawtcp.Client, error) {
	link, err := netlink.LinkByName(ifName)
	if err != nil {
		return nil, fmt.Errorf("pod interface %s: %w", ifName, err)
	}
	routes, err := netlink.RouteGet(net.IP(target.Addr().AsSlice()))
	if err != nil || len(routes) == 0 {
		return nil, fmt.Errorf("no route to %s in the pod netns: %v", target.Addr(), err)
	}
	r := routes[0]
	if r.LinkIndex != link.Attrs().Index {
		return nil, fmt.Errorf("the pod routes %s through another interface (index %d), not %s", target.Addr(), r.LinkIndex, ifName)
	}
	c := &rawtcp.Client{IfName: ifName, Dst: target, NextHop: target.Addr()}
	if gw, ok := netip.AddrFromSlice(r.Gw); ok && r.Gw != nil {
		c.NextHop = gw.Unmap()
	}
	if src, ok := netip.AddrFromSlice(r.Src); ok && r.Src != nil {
		c.Src = src.Unmap()
	} else {
		addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
		if err != nil || len(addrs) == 0 {
			return nil, fmt.Errorf("no IPv4 address on %s: %v", ifName, err)
		}
		c.Src, _ = netip.AddrFromSlice(addrs[0].IP.To4())
	}
	return c, nil
}

// dropResets inserts, first in the pod netns's filter OUTPUT, a rule that drops the
// kernel's resets of the probe's connection, and returns what deletes it.
func dropResets(backend xtables.Backend, c *rawtcp.Client) (func() error, error) {
	ipt, err := xtables.NewRunner(backend).IPTables(xtables.IPv4)
	if err != nil {
		return nil, err
	}
	rule := []string{"-s", c.Src.String() + "/32", "-d", c.Dst.Addr().String() + "/32", "-p", "tcp", "-m", "tcp",
		"--sport", strconv.Itoa(int(c.SourcePort())), "--dport", strconv.Itoa(int(c.Dst.Port())),
		"--tcp-flags", "RST", "RST", "-m", "comment", "--comment", ruleComment, "-j", "DROP"}
	if err := ipt.Insert("filter", "OUTPUT", 1, rule...); err != nil {
		return nil, fmt.Errorf("rule dropping the pod kernel's resets: %w", err)
	}
	return func() error {
		if err := ipt.Delete("filter", "OUTPUT", rule...); err != nil {
			return fmt.Errorf("deleting the probe's rule from the pod netns: %w", err)
		}
		return nil
	}, nil
}

// ProxyAnswers asks the proxy at addr, from the netns at netnsPath (empty: the
// process's own), for the self-test path and wants the nonce echoed.
func ProxyAnswers(ctx context.Context, netnsPath string, addr netip.AddrPort, nonce string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+PathPrefix+nonce, nil)
	if err != nil {
		return err
	}
	dial := (&net.Dialer{}).DialContext
	if netnsPath != "" {
		dial = func(ctx context.Context, network, address string) (net.Conn, error) {
			var conn net.Conn
			// The socket is made on this locked thread, in the netns; it stays there.
			err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, network, address)
				return err
			})
			return conn, err
		}
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true, DialContext: dial}}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("the proxy at %s does not answer the self-test: %w", addr, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096)) // the proxy's own short text
	if resp.Header.Get(Header) != nonce {
		return fmt.Errorf("the proxy at %s answered the self-test with %s and no echo (a release without the self-test?)", addr, resp.Status)
	}
	return nil
}
