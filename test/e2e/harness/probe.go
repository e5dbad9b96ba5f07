package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
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
