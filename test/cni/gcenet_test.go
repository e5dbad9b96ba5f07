package cni

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/altsrelay"
	"github.com/metaconceal/metaconceal/pkg/gce"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
)

// What GCE serves on the metadata address besides HTTP, reached from pods through the
// real plugin (cnitool, bridge, host-local), the real proxy with its ALTS relay, and the
// host guard, on a simulated node whose fake metadata server answers DNS, NTP and a
// stand-in ALTS handshaker like a GCE node's.

var (
	metadataIP = gce.MetadataIPv4.String()
	kubeEnvURL = "http://" + metadataIP + "/computeMetadata/v1/instance/attributes/kube-env"
	// refusedWithin is how fast a refused port must fail: a REJECT answers at once,
	// a DROP would leave the client waiting for its timeout.
	refusedWithin = time.Second
)

// gceWorld is a simulated GCE node: fake metadata server with DNS, NTP and ALTS on
// 169.254.169.254, metaconceal-proxy (HTTP on :988, ALTS relay on :987) on
// 169.254.169.252, and conflists for the plugin.
type gceWorld struct {
	*world
	fake     *fakegce.Server
	svc      *fakegce.Services // DNS, NTP and the ALTS stand-in
	stateDir string
}

func newGCEWorld(t *testing.T) *gceWorld {
	t.Helper()
	t.Cleanup(func() {
		_ = syscall.Rmdir("/var/lib/cni/results")
		_ = syscall.Rmdir("/var/lib/cni")
	})
	node, err := simnode.New("mc-gce")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("close simulated node: %v", err)
		}
	})
	// What a real node's CNI or kube-proxy has: NAT rules, so conntrack tracks every
	// connection through the node from the start (a netns without such rules tracks
	// none, and the guard would find no entry to delete).
	if _, err := node.Exec(context.Background(), "iptables", "-t", "nat", "-A", "POSTROUTING",
		"-s", "10.98.0.0/16", "!", "-d", "10.98.0.0/16", "-j", "MASQUERADE"); err != nil {
		t.Fatal(err)
	}
	w := &gceWorld{world: &world{t: t, node: node, confDir: t.TempDir(), tmp: t.TempDir()}, fake: fakegce.New()}
	w.stateDir = filepath.Join(w.tmp, "state")

	ln, err := node.Listen("tcp", net.JoinHostPort(metadataIP, "80"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: w.fake, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln) //nolint:errcheck // returns when Close below closes the listener
	t.Cleanup(func() { srv.Close() })

	svc := &fakegce.Services{}
	w.svc = svc
	t.Cleanup(func() {
		if err := svc.Close(); err != nil {
			t.Error(err)
		}
	})
	at := func(p uint16) string { return net.JoinHostPort(metadataIP, strconv.Itoa(int(p))) }
	dnsUDP, err := node.ListenPacket("udp", at(gce.DNSPort))
	if err != nil {
		t.Fatal(err)
	}
	dnsTCP, err := node.Listen("tcp", at(gce.DNSPort))
	if err != nil {
		t.Fatal(err)
	}
	svc.ServeDNS(dnsUDP, dnsTCP, []netip.Addr{gce.MetadataIPv4})
	ntp, err := node.ListenPacket("udp", at(gce.NTPPort))
	if err != nil {
		t.Fatal(err)
	}
	svc.ServeNTP(ntp)
	alts, err := node.Listen("tcp", at(gce.ALTSPort))
	if err != nil {
		t.Fatal(err)
	}
	svc.ServeALTS(alts)

	w.startProxy(t)
	return w
}

func (w *gceWorld) startProxy(t *testing.T) {
	t.Helper()
	logPath := filepath.Join(w.tmp, "proxy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	// The guard is installed by the test itself, when it wants it (see TestGCENodeServices).
	cmd := w.node.Command(context.Background(), proxyBinary, "--host-guard=false",
		"--listen", gce.Proxy.String(), "--alts-listen", gce.ALTSRelay.String(),
		"--upstream", "http://"+metadataIP, "--metrics-listen", "127.0.0.1:9988",
		"--state-dir", w.stateDir, "--log-format", "text", "--log-level", "debug",
		"--alts-idle-timeout", altsIdleTimeout.String())
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logFile.Close()
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("proxy log:\n%s", out)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		status, _, err := metadataGet(w.node.Path, "http://"+gce.Proxy.String()+"/computeMetadata/v1/project/project-id")
		if err == nil && status == http.StatusOK {
			return
		}
		select {
		case err := <-exited:
			out, _ := os.ReadFile(logPath)
			t.Fatalf("metaconceal-proxy exited: %v\n%s", err, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("metaconceal-proxy not ready: %d %v", status, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// conflistGCE writes a bridge + host-local + metaconceal conflist whose metaconceal
// entry writes to the proxy's state dir.
func (w *gceWorld) conflistGCE(name, bridge, subnet string, metaconceal map[string]any) {
	w.conflist(name, bridge, subnet, metaconceal)
	path := filepath.Join(w.confDir, name+".conflist")
	data, err := os.ReadFile(path)
	if err != nil {
		w.t.Fatal(err)
	}
	data = bytes.ReplaceAll(data, []byte(filepath.Join(w.tmp, name+"-state")), []byte(w.stateDir))
	if err := os.WriteFile(path, data, 0o644); err != nil {
		w.t.Fatal(err)
	}
}

func metadataGet(nsPath, url string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := simnode.HTTPClientIn(nsPath, 5*time.Second).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// resolve looks name up from the netns with Go's own resolver, its nameserver being
// the metadata address (as in a GCE node's resolv.conf), over network (udp or tcp).
func resolve(nsPath, network, name string) ([]netip.Addr, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return simnode.DialContextIn(nsPath)(ctx, network, net.JoinHostPort(metadataIP, strconv.Itoa(int(gce.DNSPort))))
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return r.LookupNetIP(ctx, "ip4", name)
}

// altsIdleTimeout is the proxy's --alts-idle-timeout here: long enough for a pod to
// open its 64 relay connections on a loaded machine, short enough to wait for.
const altsIdleTimeout = 10 * time.Second

// ntpAddr and altsAddr are the metadata address's NTP and ALTS ports.
var (
	ntpAddr  = net.JoinHostPort(metadataIP, strconv.Itoa(int(gce.NTPPort)))
	altsAddr = net.JoinHostPort(metadataIP, strconv.Itoa(int(gce.ALTSPort)))
)

// requireRefused checks that network traffic from the netns to addr is refused, and
// within refusedWithin.
func requireRefused(t *testing.T, label, nsPath, network, addr string) {
	t.Helper()
	took, err := simnode.DialRefused(nsPath, network, addr)
	if err != nil {
		t.Errorf("%s: %v", label, err)
		return
	}
	if took > refusedWithin {
		t.Errorf("%s: %s to %s refused after %v, want within %v", label, network, addr, took, refusedWithin)
	}
}

func requireConcealed(t *testing.T, label, nsPath string) {
	t.Helper()
	status, body, err := metadataGet(nsPath, kubeEnvURL)
	if err != nil || status != http.StatusForbidden || strings.Contains(body, fakegce.KubeEnvMarker) {
		t.Errorf("%s: kube-env: %d %q %v; want 403, concealed", label, status, body, err)
	}
}

// requireGCEServices checks that DNS over UDP and TCP and NTP answer from the netns.
func requireGCEServices(t *testing.T, label, nsPath string) {
	t.Helper()
	for _, network := range []string{"udp", "tcp"} {
		for name, want := range map[string]netip.Addr{gce.MetadataHostname: gce.MetadataIPv4, fakegce.TestName: fakegce.TestNameAddr} {
			got, err := resolve(nsPath, network, name)
			if err != nil || len(got) != 1 || got[0] != want {
				t.Errorf("%s: DNS over %s for %s: %v, %v; want %v", label, network, name, got, err, want)
			}
		}
		var dnsErr *net.DNSError
		if _, err := resolve(nsPath, network, "nonexistent.metaconceal.test"); !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
			t.Errorf("%s: DNS over %s for an unknown name: %v, want not found (NXDOMAIN)", label, network, err)
		}
	}
	if err := simnode.NTPQuery(nsPath, ntpAddr); err != nil {
		t.Errorf("%s: NTP: %v", label, err)
	}
}

func requireOtherPortsRefused(t *testing.T, label, nsPath string) {
	t.Helper()
	requireRefused(t, label, nsPath, "tcp", net.JoinHostPort(metadataIP, "443"))
	requireRefused(t, label, nsPath, "tcp", net.JoinHostPort(metadataIP, "8081"))
	requireRefused(t, label, nsPath, "udp", net.JoinHostPort(metadataIP, "5353"))
	requireRefused(t, label, nsPath, "udp", net.JoinHostPort(metadataIP, "124"))
}

// rawConn is an HTTP/1.1 keep-alive connection made by hand, so that a test controls
// exactly when each request goes out on it.
type rawConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, nsPath string) *rawConn {
	t.Helper()
	c, err := simnode.DialIn(nsPath, "tcp", net.JoinHostPort(metadataIP, "80"), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{c: c, r: bufio.NewReader(c)}
}

func (rc *rawConn) send(path string) error {
	_, err := fmt.Fprintf(rc.c, "GET %s HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n", path)
	return err
}

// read reads one response within d and returns its status and body.
func (rc *rawConn) read(d time.Duration) (int, string, error) {
	_ = rc.c.SetReadDeadline(time.Now().Add(d))
	resp, err := http.ReadResponse(rc.r, nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// TestGCENodeServices checks the "Done when" items of GCE's other services: from a
// concealed pod DNS (UDP and TCP) and NTP to the metadata address answer, 8080 reaches
// the metadata server's 8080 through the proxy's ALTS relay (or is refused promptly
// with alts: reject), every other port is refused within a second, and kube-env stays
// concealed, also once the pod flushed its own rules and only the host guard is left.
// A pod's keep-alive connection and long poll made straight to the metadata server
// before the guard read nothing once it is installed; the node's own stay.
func TestGCENodeServices(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-save", "iptables-restore")
	w := newGCEWorld(t)
	w.conflistGCE("mc-gce", "mcgbr0", "10.98.1.0/24", map[string]any{})
	w.conflistGCE("mc-gce-reject", "mcgbr1", "10.98.2.0/24", map[string]any{"alts": "reject"})

	relayName, relayPod, err := w.node.NewPodNS("mc-gce-relay")
	if err != nil {
		t.Fatal(err)
	}
	_, rejectPod, err := w.node.NewPodNS("mc-gce-reject")
	if err != nil {
		t.Fatal(err)
	}
	flusherName, flusherPod, err := w.node.NewPodNS("mc-gce-flusher")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct{ network, path string }{{"mc-gce", relayPod}, {"mc-gce-reject", rejectPod}, {"mc-gce", flusherPod}} {
		if err := w.add(t, p.network, p.path); err != nil {
			t.Fatalf("cnitool add %s: %v", p.network, err)
		}
		if _, err := w.cnitool("check", p.network, p.path); err != nil {
			t.Errorf("cnitool check %s: %v", p.network, err)
		}
	}

	// Control: the node reaches everything directly, and the ALTS stand-in answers
	// every other request on 8080 too.
	requireGCEServices(t, "node", w.node.Path)
	if err := simnode.ALTSExchange(w.node.Path, altsAddr); err != nil {
		t.Fatalf("node: ALTS port: %v", err)
	}
	for _, p := range fakegce.ALTSOtherProbes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		got, err := p.Do(ctx, simnode.DialContextIn(w.node.Path), altsAddr)
		cancel()
		if err != nil || !strings.HasPrefix(got, fakegce.ALTSOtherMarker) {
			t.Fatalf("control: node: %s: %q, %v; want the stand-in's other marker", p.Name, got, err)
		}
	}

	t.Run("alts relay pod", func(t *testing.T) {
		requireGCEServices(t, "relay pod", relayPod)
		w.requireALTSOnly(t, "relay pod", relayPod)
		requireOtherPortsRefused(t, "relay pod", relayPod)
		requireConcealed(t, "relay pod", relayPod)
	})
	t.Run("alts reject pod", func(t *testing.T) {
		requireGCEServices(t, "reject pod", rejectPod)
		requireRefused(t, "reject pod", rejectPod, "tcp", net.JoinHostPort(metadataIP, "8080"))
		requireOtherPortsRefused(t, "reject pod", rejectPod)
		requireConcealed(t, "reject pod", rejectPod)
	})
	// Without attestation (the proxy runs with --host-guard=false here) every relay
	// connection is unattributed and all share one per-pod budget: another pod is
	// refused too (fail closed). pkg/altsrelay tests the attested case.
	t.Run("alts relay: unattributed connections share one cap; idle closed", func(t *testing.T) {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for i := range altsrelay.DefaultMaxPerPod {
			c, err := simnode.ALTSHold(relayPod, altsAddr)
			if err != nil {
				t.Fatalf("relay pod's held call %d: %v", i, err)
			}
			held = append(held, c)
		}
		if c, err := simnode.ALTSHold(relayPod, altsAddr); err == nil {
			c.Close()
			t.Errorf("relay pod's call %d relayed, over its cap", altsrelay.DefaultMaxPerPod+1)
		}
		if err := simnode.ALTSExchange(flusherPod, altsAddr); err == nil {
			t.Errorf("another pod's handshake relayed while the unattributed budget is full")
		}
		for _, c := range held {
			c.Close()
		}
		held = nil
		// The shared budget is free again once the relay has seen the closes.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, body, err := metadataGet(w.node.Path, "http://127.0.0.1:9988/metrics")
			if err == nil && strings.Contains(body, "metaconceal_proxy_alts_connections_open 0\n") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("relay connections still open 10 s after the pod closed them:\n%s", grepLines(body, "alts"))
			}
		}
		idle, err := simnode.ALTSHold(flusherPod, altsAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		_ = idle.SetReadDeadline(time.Now().Add(3 * altsIdleTimeout))
		if _, err := io.Copy(io.Discard, idle); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Errorf("idle relay connection still open after %v (idle timeout %v)", 3*altsIdleTimeout, altsIdleTimeout)
			}
		}
		_, body, err := metadataGet(w.node.Path, "http://127.0.0.1:9988/metrics")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{`metaconceal_proxy_alts_refused_total{reason="pod_limit"} 2`, `metaconceal_proxy_alts_idle_closed_total 1`} {
			if !strings.Contains(body, want+"\n") {
				t.Errorf("metrics lack %s:\n%s", want, grepLines(body, "alts"))
			}
		}
	})
	// Unattested, the relay counts connections as unattributed.
	if _, body, err := metadataGet(w.node.Path, "http://127.0.0.1:9988/metrics"); err != nil ||
		!regexp.MustCompile(`metaconceal_proxy_alts_connections_total\{namespace="unattributed"\} [1-9]`).MatchString(body) {
		t.Errorf("relay metrics lack the unattributed namespace (%v):\n%s", err, grepLines(body, "alts"))
	}

	// Before the guard: a pod that flushed its own rules reaches the server directly,
	// holds a keep-alive connection and a long poll over a listing that carries kube-env.
	flush(t, flusherName)
	keepAlive := dialRaw(t, flusherPod)
	if err := keepAlive.send("/computeMetadata/v1/instance/attributes/kube-env"); err != nil {
		t.Fatal(err)
	}
	if status, body, err := keepAlive.read(5 * time.Second); err != nil || status != 200 || !strings.Contains(body, fakegce.KubeEnvMarker) {
		t.Fatalf("control: unguarded flushed pod reads kube-env directly: %d %v", status, err)
	}
	w.fake.Set("instance/attributes/mc-trigger", "before")
	poll := dialRaw(t, flusherPod)
	waiting := w.fake.Waiting()
	if err := poll.send("/computeMetadata/v1/instance/attributes/?recursive=true&wait_for_change=true"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the long poll to be held", func() bool { return w.fake.Waiting() > waiting })
	// The node's own keep-alive connection, made before the guard too.
	nodeClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: simnode.DialContextIn(w.node.Path)}}
	if _, err := nodeGet(nodeClient); err != nil {
		t.Fatalf("node before the guard: %v", err)
	}

	var guardLog bytes.Buffer
	gcfg := hostguard.Config{ListenAddrs: []netip.AddrPort{gce.Proxy}, ALTSListenAddrs: []netip.AddrPort{gce.ALTSRelay}}
	if err := simnode.In(w.node.Path, func() error {
		return hostguard.Install(context.Background(), gcfg, slog.New(slog.NewTextHandler(&guardLog, nil)))
	}); err != nil {
		t.Fatalf("install host guard: %v", err)
	}
	if m := regexp.MustCompile(`conntrack_entries_deleted=(\d+)`).FindStringSubmatch(guardLog.String()); m == nil || m[1] == "0" || m[1] == "1" {
		t.Errorf("guard did not delete the conntrack entries of the two direct pod connections:\n%s", guardLog.String())
	}

	t.Run("keep-alive made before the guard", func(t *testing.T) {
		w.fake.Set("instance/attributes/mc-trigger", "after") // answers the held poll
		if status, body, err := poll.read(3 * time.Second); err == nil || strings.Contains(body, fakegce.KubeEnvMarker) {
			t.Errorf("long poll made before the guard read an answer after it: %d %q %v", status, body, err)
		}
		if err := keepAlive.send("/computeMetadata/v1/instance/attributes/kube-env"); err == nil {
			if status, body, err := keepAlive.read(3 * time.Second); err == nil || strings.Contains(body, fakegce.KubeEnvMarker) {
				t.Errorf("keep-alive connection made before the guard read an answer after it: %d %q %v", status, body, err)
			}
		}
		reused, err := nodeGet(nodeClient)
		if err != nil || !reused {
			t.Errorf("node's keep-alive connection after the guard: reused %v, %v; want it untouched", reused, err)
		}
	})

	t.Run("host guard with the pod's rules flushed", func(t *testing.T) {
		flush(t, relayName)
		for label, pod := range map[string]string{"flushed relay pod": relayPod, "flushed pod": flusherPod} {
			requireGCEServices(t, label, pod)
			requireConcealed(t, label, pod)
			w.requireALTSOnly(t, label+", through the guard's relay DNAT", pod)
			requireOtherPortsRefused(t, label, pod)
		}
		// The node keeps full, direct access.
		requireGCEServices(t, "node with the guard", w.node.Path)
		if status, body, err := metadataGet(w.node.Path, kubeEnvURL); err != nil || status != 200 || !strings.Contains(body, fakegce.KubeEnvMarker) {
			t.Errorf("node with the guard: kube-env %d %v", status, err)
		}
	})
}

// requireALTSOnly checks that from the pod, 8080 carries the gRPC call of ALTS's
// handshaker client through the relay, and nothing else: HTTP/1.1 and h2c requests
// for other paths get no answer, the stand-in behind the relay never sees them, and
// the relay audits the refusals naming the pod.
func (w *gceWorld) requireALTSOnly(t *testing.T, label, pod string) {
	t.Helper()
	mark := len(w.svc.ALTSRequests())
	if err := simnode.ALTSExchange(pod, altsAddr); err != nil {
		t.Errorf("%s: 8080 through the relay: %v", label, err)
	}
	if err := simnode.ALTSOthersUnanswered(pod, altsAddr); err != nil {
		t.Errorf("%s: 8080 answered what is not the handshaker service:\n%v", label, err)
	}
	seen := w.svc.ALTSRequests()[mark:]
	if len(seen) != 1 || seen[0].Path != fakegce.ALTSHandshakerPath || seen[0].Proto != "HTTP/2.0" {
		t.Errorf("%s: the stand-in behind the relay saw %v; want the handshaker call only", label, seen)
	}
	log, err := os.ReadFile(filepath.Join(w.tmp, "proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, reason := range []string{"http1", "path", "not_grpc"} {
		// The proxy runs without the guard's attestation here: every connection is
		// unattributed, and its audit line names no pod (fail closed).
		if !regexp.MustCompile(`ALTS relay: connection refused" pod_namespace=unattributed pod_name="" source_ip=10\.98\.\S+ reason=` + reason).Match(log) {
			t.Errorf("%s: no unattributed audit line for reason %s:\n%s", label, reason, grepLines(string(log), "ALTS relay"))
		}
	}
}

// flush removes every rule from the pod's nat and filter tables, as a pod with
// CAP_NET_ADMIN can.
func flush(t *testing.T, podName string) {
	t.Helper()
	for _, table := range []string{"nat", "filter"} {
		if _, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, "iptables", "-t", table, "-F"); err != nil {
			t.Fatal(err)
		}
	}
	if out := iptablesSaveAll(t, podName); strings.Contains(out, "-A OUTPUT") {
		t.Fatalf("rules left after the flush:\n%s", out)
	}
}

// nodeGet fetches kube-env from the node and reports whether the connection was reused.
func nodeGet(c *http.Client) (reused bool, err error) {
	req, err := http.NewRequest(http.MethodGet, kubeEnvURL, nil)
	if err != nil {
		return false, err
	}
	req.Header.Set("Metadata-Flavor", "Google")
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused },
	}))
	resp, err := c.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || !strings.Contains(string(body), fakegce.KubeEnvMarker) {
		return reused, fmt.Errorf("kube-env from the node: %d %v", resp.StatusCode, err)
	}
	return reused, nil
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func grepLines(text, word string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
