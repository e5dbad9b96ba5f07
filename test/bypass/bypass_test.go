// Package bypass holds the attacks that a pod's own netns rules cannot stop and that
// the host guard must: a pod with CAP_NET_RAW only that speaks TCP to the metadata
// server over an AF_PACKET socket, a pod that forges an exposed pod's IP to borrow
// its exposed access, and a pod that claims more addresses to multiply its budgets. Every test builds a simulated node (internal/testlib/simnode) and runs the
// guard, the proxy and the fake metadata server there; nothing touches the machine's
// own netns, except the proxy's upstream connections, which go to a fake metadata
// server on the machine's loopback.
package bypass

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/hostguard"
	"github.com/metaconceal/metaconceal/pkg/podindex"
	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(runRawHelper())
	}
	os.Exit(m.Run())
}

const (
	bridgeName = "mcbyp0"
	gatewayIP  = "10.251.0.1"
	kubeEnv    = "/computeMetadata/v1/instance/attributes/kube-env"
)

var (
	metadataAddr = netip.MustParseAddrPort("169.254.169.254:80")
	proxyAddr    = netip.MustParseAddrPort("169.254.169.252:988")
)

// podSwap lets a test change the proxy's pod index while it serves.
type podSwap struct {
	x atomic.Pointer[podindex.Index]
}

func (s *podSwap) Lookup(ip netip.Addr) (podindex.Pod, bool) { return s.x.Load().Lookup(ip) }

type world struct {
	t        testing.TB
	node     *simnode.Node
	stateDir string
	pods     podSwap
	index    *podindex.Index // the proxy's, with the guard's attestation as its Attestor
	fake     *fakegce.Server
	guard    hostguard.Config
	helper   string // the test binary, where an unprivileged user can run it
	log      *slog.Logger
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// newWorld builds a node netns with a bridge, the fake metadata server on
// 169.254.169.254:80 and metaconceal's proxy on 169.254.169.252:988 (unattributed)
// and on the attested and exposed ports the guard's attestation rules send pods to;
// tweaks change the proxy's config. The attestation rules follow the state records
// at each refresh.
func newWorld(t testing.TB, tweaks ...func(*proxy.Config)) *world {
	t.Helper()
	testutil.RequirePrivileged(t, "ip", "iptables", "iptables-restore", "iptables-save")
	node, err := simnode.New("mc-byp")
	if err != nil {
		t.Fatalf("creating simulated node: %v", err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("deleting simulated node: %v", err)
		}
	})
	w := &world{t: t, node: node, stateDir: t.TempDir(), log: slog.New(slog.NewTextHandler(tWriter{t}, nil))}
	w.guard = hostguard.Config{ListenAddrs: []netip.AddrPort{proxyAddr}}
	w.ip("link", "add", bridgeName, "type", "bridge")
	w.ip("addr", "add", gatewayIP+"/24", "dev", bridgeName)
	w.ip("link", "set", bridgeName, "up")

	fake := fakegce.New()
	w.fake = fake
	// The metadata server as pods reach it: in the node netns.
	w.serve(w.listen(metadataAddr.String()), fake)
	// The same server as the proxy's upstream: the proxy's connections are made by
	// goroutines of this process, in the machine's own netns, so it is on loopback there.
	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w.serve(upLn, fake)

	pol, err := policy.New(policy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	attest, err := hostguard.NewSpoofGuard(w.guard, w.log)
	if err != nil {
		t.Fatal(err)
	}
	attest.NetnsPath = node.Path
	w.index = podindex.New(w.stateDir, w.log, podindex.WithAttestor(attest))
	w.pods.x.Store(w.index)
	cfg := proxy.Config{Upstream: &url.URL{Scheme: "http", Host: upLn.Addr().String()}, Policy: pol, Pods: &w.pods, Log: w.log}
	for _, tw := range tweaks {
		tw(&cfg)
	}
	h, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	srv := proxy.NewServer(h, w.log)
	attested, err := w.guard.AttestedListeners()
	if err != nil {
		t.Fatal(err)
	}
	ln := w.listen(proxyAddr.String())
	go func() { _ = srv.Serve(h.Listener(ln)) }()
	for _, al := range attested {
		ln := w.listen(al.Addr.String())
		go func() { _ = srv.Serve(h.ListenerFor(ln, al.Ingress)) }()
	}
	t.Cleanup(func() { _ = srv.Close() })

	w.helper = copyTestBinary(t)
	return w
}

func (w *world) ip(args ...string) string {
	w.t.Helper()
	out, err := simnode.Run(context.Background(), "ip", append([]string{"-n", w.node.Name}, args...)...)
	if err != nil {
		w.t.Fatal(err)
	}
	return out
}

func (w *world) listen(addr string) net.Listener {
	w.t.Helper()
	ln, err := w.node.Listen("tcp", addr)
	if err != nil {
		w.t.Fatal(err)
	}
	return ln
}

func (w *world) serve(ln net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	w.t.Cleanup(func() { _ = srv.Close() })
}

// pod is a pod netns on the node's bridge, or routed (ptp).
type pod struct {
	name, path string
	ip         netip.Addr
	hostIf     string
	gw         string // its default gateway
}

func (w *world) addPod(short, ip string) pod {
	w.t.Helper()
	name, path, err := w.node.NewPodNS("mc-byp-" + short)
	if err != nil {
		w.t.Fatal(err)
	}
	p := pod{name: name, path: path, ip: netip.MustParseAddr(ip), hostIf: "mcv" + short, gw: gatewayIP}
	w.ip("link", "add", p.hostIf, "type", "veth", "peer", "name", "eth0", "netns", name)
	w.ip("link", "set", p.hostIf, "master", bridgeName)
	w.ip("link", "set", p.hostIf, "up")
	for _, args := range [][]string{
		{"addr", "add", ip + "/24", "dev", "eth0"},
		{"link", "set", "eth0", "up"},
		{"route", "add", "default", "via", gatewayIP},
	} {
		if _, err := simnode.Run(context.Background(), "ip", append([]string{"-n", name}, args...)...); err != nil {
			w.t.Fatal(err)
		}
	}
	return p
}

// record writes the pod's state record, as the CNI plugin's ADD does.
func (w *world) record(p pod, exposedReason string) {
	w.t.Helper()
	rec := state.NewRecord(state.Attachment{Network: "test", ContainerID: "c-" + p.name, IfName: "eth0", Netns: p.path, HostIf: p.hostIf},
		state.PodRef{Namespace: "team", Name: p.name}, []netip.Addr{p.ip}, exposedReason)
	if err := state.Write(w.stateDir, rec); err != nil {
		w.t.Fatal(err)
	}
}

// refresh runs the proxy's pod index refresher once: the records are read and the
// attestation rules applied, as the running proxy does within its refresh interval.
func (w *world) refresh() { w.index.Refresh(true) }

func (w *world) installGuard() {
	w.t.Helper()
	err := simnode.In(w.node.Path, func() error { return hostguard.Install(context.Background(), w.guard, w.log) })
	if err != nil {
		w.t.Fatalf("installing the host guard in the node netns: %v", err)
	}
}

// get asks for path from inside the pod with an ordinary socket (through its own
// netns's rules, if any), to the metadata address.
func (w *world) get(p pod, path string) (int, string) {
	w.t.Helper()
	req, err := http.NewRequest("GET", "http://"+metadataAddr.String()+path, nil)
	if err != nil {
		w.t.Fatal(err)
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := simnode.HTTPClientIn(p.path, 5*time.Second).Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// raw runs the attacker in pod p: a process with CAP_NET_RAW only that claims src on
// the link and speaks HTTP over hand-made TCP to the metadata address. It returns what
// the server answered (empty when the connection was dropped).
func (w *world) raw(p pod, src string) string {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, w.helper, "-test.run=^$")
	req := "GET " + kubeEnv + " HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
	cmd.Env = []string{helperEnv + "=1", helperIfEnv + "=eth0", helperSrcEnv + "=" + src, helperGWEnv + "=" + p.gw,
		helperDstEnv + "=" + metadataAddr.String(), helperReqEnv + "=" + req}
	// Not root: nobody, with CAP_NET_RAW as its only (ambient) capability, as a
	// container with the default capability set minus everything else would hold it.
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: 65534, Gid: 65534},
		AmbientCaps: []uintptr{unix.CAP_NET_RAW},
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Started from a thread in the pod netns: the process lives there.
	if err := simnode.In(p.path, cmd.Start); err != nil {
		w.t.Fatalf("starting the raw helper in %s: %v", p.name, err)
	}
	err := cmd.Wait()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 1) {
		// Exit 1 is a failed exchange (dropped, reset); anything else is a broken test.
		w.t.Fatalf("raw helper: %v: %s", err, stderr.String())
	}
	w.t.Logf("raw helper from %s as %s: %d bytes; %s", p.name, src, stdout.Len(), strings.TrimSpace(stderr.String()))
	return stdout.String()
}

// copyTestBinary copies the running test binary where the unprivileged helper user
// can execute it (go test builds it under a directory only root can enter).
func copyTestBinary(t testing.TB) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "mc-bypass-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	path := filepath.Join(dir, "bypass.test")
	out, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// assertHostUntouched checks that the machine's own netns carries nothing of ours.
func assertHostUntouched(t *testing.T) {
	t.Helper()
	out, err := exec.Command("iptables-save").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-save (host, read only): %v: %s", err, out)
	}
	for _, chain := range []string{hostguard.Chain, hostguard.SpoofChain} {
		if strings.Contains(string(out), chain) {
			t.Errorf("the machine's own netns has %s rules", chain)
		}
	}
}

// TestRawSocketBypassNeedsHostGuard: a pod whose netns carries the concealment rules
// (what the CNI plugin installs) and that holds CAP_NET_RAW only reads kube-env with a
// hand-made TCP exchange over AF_PACKET, which its own iptables never sees; with the
// host guard in the node netns it gets the concealed answer instead.
func TestRawSocketBypassNeedsHostGuard(t *testing.T) {
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	w := newWorld(t)
	atk := w.addPod("raw", "10.251.0.3")
	w.record(atk, "")
	w.podRules(atk) // the pod's own rules, as the plugin renders them for port 80
	// An ordinary socket goes through those rules: concealed.
	if code, body := w.get(atk, kubeEnv); code != http.StatusForbidden || strings.Contains(body, fakegce.KubeEnvMarker) {
		t.Fatalf("ordinary GET of kube-env from the pod: %d %q; want 403 from the proxy", code, body)
	}

	// 10.251.0.77 is on nobody's interface: the pod's kernel drops the answers instead
	// of resetting a connection it does not know, and the helper answers ARP for it.
	const spare = "10.251.0.77"
	if got := w.raw(atk, spare); !strings.Contains(got, fakegce.KubeEnvMarker) {
		t.Fatalf("without the host guard the raw exchange did not read kube-env (the attack this test is about did not work): %q", got)
	}

	w.installGuard()
	got := w.raw(atk, spare)
	if strings.Contains(got, fakegce.KubeEnvMarker) {
		t.Fatalf("with the host guard the raw exchange still read kube-env:\n%s", got)
	}
	if got != "" && !strings.Contains(got, "403") {
		t.Errorf("with the host guard: want the proxy's concealed answer or nothing, got %q", got)
	}
	t.Logf("with the host guard the raw exchange got: %q", firstLine(got))
}

// TestForgedExposedAddressIsConcealed: a pod with CAP_NET_RAW only forges an exposed
// pod's IP (ARP and its own TCP). Whether the forged connection comes before the
// exposed pod's ADD or after it, it gets the concealed answer on a bridge (the
// attestation rule wants the exposed pod's bridge port, so the connection is
// unattributed) and no connection at all on a routed veth (the answers go to the real
// owner); the exposed pod itself is served in full, through the exposed listener.
// Before issue 17 the proxy named a connection exposed by a lookup of its source IP
// at accept (and the anti-spoofing DROP could come after the forged SYN).
func TestForgedExposedAddressIsConcealed(t *testing.T) {
	t.Cleanup(func() { assertHostUntouched(t) })
	for _, datapath := range []string{"bridge", "ptp"} {
		t.Run(datapath, func(t *testing.T) {
			t.Parallel()
			w := newWorld(t)
			var victim, atk pod
			if datapath == "bridge" {
				victim, atk = w.addPod("vic", "10.251.0.2"), w.addPod("spf", "10.251.0.3")
			} else {
				victim, atk = w.addPtpPod("vir", "10.252.0.2", "10.252.0.1"), w.addPtpPod("spr", "10.252.0.3", "10.252.0.1")
			}
			w.installGuard()
			w.record(atk, "")
			w.refresh()
			forged := func(stage string) {
				t.Helper()
				got := w.raw(atk, victim.ip.String())
				if strings.Contains(got, fakegce.KubeEnvMarker) {
					t.Fatalf("%s: the forged connection read kube-env:\n%s", stage, got)
				}
				if datapath == "bridge" && !strings.Contains(firstLine(got), "403") {
					t.Errorf("%s: forged connection on a bridge: %q; want the concealed answer", stage, firstLine(got))
				}
				if datapath == "ptp" && got != "" && !strings.Contains(firstLine(got), "403") {
					t.Errorf("%s: forged connection on a routed veth: %q; want nothing or the concealed answer", stage, firstLine(got))
				}
			}
			exposedOK := func(stage string) {
				t.Helper()
				// What the attacker's ARP did to the node's neighbour entry is undone, as
				// the victim's next ARP exchange would.
				_, _ = simnode.Run(context.Background(), "ip", "-n", w.node.Name, "neigh", "del", victim.ip.String(), "dev", victim.hostIf)
				_, _ = simnode.Run(context.Background(), "ip", "-n", w.node.Name, "neigh", "del", victim.ip.String(), "dev", bridgeName)
				if code, body := w.get(victim, kubeEnv); code != http.StatusOK || !strings.Contains(body, fakegce.KubeEnvMarker) {
					t.Fatalf("%s: the exposed pod's own GET of kube-env: %d %q; want 200 with kube-env", stage, code, firstLine(body))
				}
			}

			forged("before the exposed pod's ADD")
			w.record(victim, "excludeNamespaces")
			forged("after the exposed pod's record, before the refresher ran")
			w.refresh()
			save, err := w.node.Exec(context.Background(), "iptables-save", "-t", "nat")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(save, "-s "+victim.ip.String()+"/32") || !strings.Contains(save, "-j "+hostguard.AttestExposedChain) {
				t.Fatalf("no attestation rule for the exposed pod:\n%s", save)
			}
			exposedOK("after the exposed pod's ADD")
			forged("after the exposed pod's ADD")
			exposedOK("after the attack")
			if code, body := w.get(atk, kubeEnv); code != http.StatusForbidden {
				t.Errorf("the attacker's own GET of kube-env: %d %q; want 403", code, firstLine(body))
			}

			// remove-host-guard takes the attestation rules away with the guard.
			if err := simnode.In(w.node.Path, func() error { return hostguard.Remove(context.Background(), w.guard, w.log) }); err != nil {
				t.Fatal(err)
			}
			save, err = w.node.Exec(context.Background(), "iptables-save")
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(save, "METACONCEAL") {
				t.Errorf("after Remove the node still has guard rules:\n%s", save)
			}
		})
	}
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
