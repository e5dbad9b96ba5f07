package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// CurlResult is what one curl run inside a network namespace gave.
type CurlResult struct {
	Status int    // HTTP status; 0 when no response came
	Body   string // response body
	Exit   int    // curl's exit code (7: connection refused, 28: timeout)
	Stderr string
}

func (r CurlResult) String() string {
	body := r.Body
	if len(body) > 120 {
		body = body[:120] + "..."
	}
	return fmt.Sprintf("status=%d exit=%d body=%q stderr=%q", r.Status, r.Exit, body, strings.TrimSpace(r.Stderr))
}

const statusMarker = "\n@@status@@"

// Curl runs curl inside the network namespace at netnsPath (nsenter --net) with a
// 5 s limit. args are curl's own (URL, headers, ...).
func Curl(ctx context.Context, netnsPath string, args ...string) CurlResult {
	return runCurl(ctx, []string{"nsenter", "--net=" + netnsPath, "curl"}, args)
}

// CurlWithHosts is Curl as a container of the pod runs it: in the pod's netns, with
// the hosts file the runtime made for the sandbox bind-mounted over /etc/hosts (in a
// private mount namespace of this one curl, as containerd's CRI mounts it into each
// container), so names resolve through that file.
func CurlWithHosts(ctx context.Context, netnsPath, hostsFile string, args ...string) CurlResult {
	return runCurl(ctx, []string{"nsenter", "--net=" + netnsPath,
		"unshare", "--mount", "--propagation", "private",
		"sh", "-c", `mount --bind "$0" /etc/hosts && exec curl "$@"`, hostsFile}, args)
}

func runCurl(ctx context.Context, prefix, args []string) CurlResult {
	full := append(append(prefix[1:len(prefix):len(prefix)], "-sS", "-m", "5", "-w", statusMarker+"%{http_code}"), args...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, prefix[0], full...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := CurlResult{Stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		res.Exit = exitErr.ExitCode()
	default:
		res.Exit = -1
		res.Stderr += err.Error()
	}
	out := stdout.String()
	if i := strings.LastIndex(out, statusMarker); i >= 0 {
		res.Status, _ = strconv.Atoi(strings.TrimSpace(out[i+len(statusMarker):]))
		out = out[:i]
	}
	res.Body = out
	return res
}

// MetadataGet asks the metadata server at url the way a GCE client does; extra are
// more curl arguments (an empty url leaves the URL to them).
func MetadataGet(ctx context.Context, netnsPath, url string, extra ...string) CurlResult {
	args := append([]string{"-H", "Metadata-Flavor: Google"}, extra...)
	if url != "" {
		args = append(args, url)
	}
	return Curl(ctx, netnsPath, args...)
}

// MetadataGetWithHosts is MetadataGet through CurlWithHosts.
func MetadataGetWithHosts(ctx context.Context, netnsPath, hostsFile, url string) CurlResult {
	return CurlWithHosts(ctx, netnsPath, hostsFile, "-H", "Metadata-Flavor: Google", url)
}

// Witness listens on one address inside a netns and counts what reaches it, so a test
// can tell "refused" from "reached, and something answered".
type Witness struct {
	hits  atomic.Int64
	close func() error
}

// Hits is how many connections (TCP) or datagrams (UDP) arrived.
func (w *Witness) Hits() int64 { return w.hits.Load() }

// Close stops listening.
func (w *Witness) Close() error { return w.close() }

// ListenTCPWitness answers every TCP connection to addr in the netns with an HTTP
// response whose body is "REACHED".
func ListenTCPWitness(netnsPath, addr string) (*Witness, error) {
	var ln net.Listener
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in %s: %w", addr, netnsPath, err)
	}
	w := &Witness{close: ln.Close}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			w.hits.Add(1)
			_, _ = c.Write([]byte("HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nREACHED\n"))
			_ = c.Close()
		}
	}()
	return w, nil
}

// ListenUDPWitness echoes every datagram sent to addr in the netns.
func ListenUDPWitness(netnsPath, addr string) (*Witness, error) {
	var pc net.PacketConn
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in %s: %w", addr, netnsPath, err)
	}
	w := &Witness{close: pc.Close}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			w.hits.Add(1)
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	return w, nil
}

// UDPExchange sends one datagram to addr from inside the netns and waits up to timeout
// for an answer; an error means none came (refused, filtered or lost).
func UDPExchange(netnsPath, addr string, timeout time.Duration) error {
	return ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		conn, err := net.Dial("udp4", addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		if _, err := conn.Write([]byte("metaconceal-e2e")); err != nil {
			return err
		}
		_ = conn.SetReadDeadline(time.Now().Add(timeout))
		buf := make([]byte, 1500)
		_, err = conn.Read(buf)
		return err
	})
}

// Ping sends one ICMP echo request to ip from inside the netns and waits up to timeout
// for the echo reply; an error means none came.
func Ping(netnsPath, ip string, timeout time.Duration) error {
	return ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		conn, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
		if err != nil {
			return fmt.Errorf("open raw icmp socket: %w", err)
		}
		defer conn.Close()
		const id, seq = 0x4d43, 1
		msg := []byte{8, 0, 0, 0, id >> 8, id & 0xff, 0, seq, 'm', 'c'}
		sum := icmpChecksum(msg)
		msg[2], msg[3] = byte(sum>>8), byte(sum)
		dst := &net.IPAddr{IP: net.ParseIP(ip)}
		if _, err := conn.WriteTo(msg, dst); err != nil {
			return fmt.Errorf("send echo: %w", err)
		}
		deadline := time.Now().Add(timeout)
		_ = conn.SetReadDeadline(deadline)
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				return err
			}
			// An echo reply from ip carrying our id; anything else (our own request
			// looped back on lo, an ICMP error) is not an answer.
			if n >= 8 && buf[0] == 0 && from.String() == ip && buf[4] == id>>8 && buf[5] == id&0xff {
				return nil
			}
		}
	})
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// ResolverProbeEnv names the environment variable that turns a test binary into the
// resolver probe (see Resolve): its value is the name to look up.
const ResolverProbeEnv = "METACONCEAL_E2E_RESOLVE"

// resolverNetworkEnv carries the transport, "udp" or "tcp", to the probe.
const resolverNetworkEnv = "METACONCEAL_E2E_RESOLVE_NETWORK"

// RunResolverProbe is the probe's body: call it first in TestMain. When the process was
// started by Resolve, it looks the name up with Go's own resolver, which reads
// /etc/resolv.conf (the pod's, bind-mounted) as any resolver does, over the transport
// Resolve asked for, prints one address per line, and exits: 0 when found, 3 when
// the name does not exist, 1 on any other error. Otherwise it returns.
func RunResolverProbe() {
	name := os.Getenv(ResolverProbeEnv)
	if name == "" {
		return
	}
	network := os.Getenv(resolverNetworkEnv)
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, address string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, address) // address: a nameserver of resolv.conf
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := r.LookupNetIP(ctx, "ip4", name)
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	case err != nil:
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	os.Exit(0)
}

// ErrNameNotFound is what Resolve returns for a name the resolver says does not exist.
var ErrNameNotFound = errors.New("name not found (NXDOMAIN)")

// Resolve looks name up as a container of the pod would: this test binary (which must
// call RunResolverProbe in TestMain) runs in the pod's netns with the sandbox's
// resolv.conf and hosts file bind-mounted over /etc/resolv.conf and /etc/hosts in a
// private mount namespace, and resolves over network ("udp", or "tcp" as with
// `options use-vc`).
func Resolve(ctx context.Context, netnsPath, resolvConf, hostsFile, network, name string) ([]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+netnsPath,
		"unshare", "--mount", "--propagation", "private",
		"sh", "-c", `mount --bind "$0" /etc/resolv.conf && mount --bind "$1" /etc/hosts && exec "$2"`,
		resolvConf, hostsFile, self)
	cmd.Env = append(os.Environ(), ResolverProbeEnv+"="+name, resolverNetworkEnv+"="+network)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var exitErr *exec.ExitError
	switch {
	case errors.As(err, &exitErr) && exitErr.ExitCode() == 3:
		return nil, fmt.Errorf("%w: %s", ErrNameNotFound, strings.TrimSpace(stderr.String()))
	case err != nil:
		return nil, fmt.Errorf("resolver probe for %s over %s: %w: %s", name, network, err, strings.TrimSpace(stderr.String()))
	}
	return strings.Fields(stdout.String()), nil
}
