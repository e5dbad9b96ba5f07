// Package cni is the end-to-end test of the metaconceal plugin through cnitool and the
// pinned bridge + host-local plugins, on a simulated node (internal/testlib/simnode):
// nothing is sent from, or changed in, the machine's own network namespace.
package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
	"github.com/metaconceal/metaconceal/pkg/state"
)

// cniPath lists the plugin directories: a fresh build of metaconceal first, then the
// pinned tools.
var cniPath string

// proxyBinary is metaconceal-proxy built from this tree.
var proxyBinary string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	binDir, err := testutil.BinDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	pluginDir, err := os.MkdirTemp("", "mc-cni-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(pluginDir)
	// Build the plugin and the proxy from this tree so the test never runs a stale bin/.
	build := exec.Command("go", "build", "-o", pluginDir+"/",
		"github.com/metaconceal/metaconceal/plugins/metaconceal", "github.com/metaconceal/metaconceal/cmd/metaconceal-proxy")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build metaconceal metaconceal-proxy: %v\n%s", err, out)
		return 1
	}
	proxyBinary = filepath.Join(pluginDir, "metaconceal-proxy")
	cniPath = pluginDir + string(os.PathListSeparator) + binDir
	return m.Run()
}

// world is a simulated node with the metadata and proxy servers, and conflists.
type world struct {
	t       *testing.T
	node    *simnode.Node
	confDir string
	tmp     string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	for _, tool := range []string{"cnitool", "bridge", "host-local"} {
		if _, err := os.Stat(filepath.Join(strings.Split(cniPath, string(os.PathListSeparator))[1], tool)); err != nil {
			t.Fatalf("%s missing (run make build): %v", tool, err)
		}
	}
	// cnitool keeps libcni's cache in /var/lib/cni; the DELs empty it of our entries.
	// Registered first so it runs last; rmdir leaves a dir someone else still uses.
	t.Cleanup(func() {
		_ = syscall.Rmdir("/var/lib/cni/results")
		_ = syscall.Rmdir("/var/lib/cni")
	})
	node, err := simnode.New("mc-cni")
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, node: node, confDir: t.TempDir(), tmp: t.TempDir()}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("close simulated node: %v", err)
		}
	})
	// TCP servers that answer with the address that served them, and a UDP echo.
	for _, addr := range []string{simnode.MetadataIP + ":80", simnode.MetadataIP + ":8080", simnode.ProxyIP + ":988"} {
		ln, err := node.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			fmt.Fprint(rw, r.Context().Value(http.LocalAddrContextKey).(net.Addr).String())
		}), ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln) //nolint:errcheck // returns when Close below closes the listener
		t.Cleanup(func() { srv.Close() })
	}
	udp, err := node.ListenPacket("udp", simnode.MetadataIP+":5353")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { udp.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := udp.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = udp.WriteTo(buf[:n], from) // echo; a lost reply shows as a test timeout
		}
	}()
	return w
}

// conflist writes a bridge + host-local + metaconceal conflist named name.
func (w *world) conflist(name, bridge, subnet string, metaconceal map[string]any) {
	w.t.Helper()
	metaconceal["type"] = "metaconceal"
	metaconceal["stateDir"] = filepath.Join(w.tmp, name+"-state")
	list := map[string]any{
		"cniVersion": "1.1.0", "name": name,
		"plugins": []map[string]any{{
			"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": subnet}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": filepath.Join(w.tmp, name+"-ipam")},
		}, metaconceal},
	}
	data, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.confDir, name+".conflist"), data, 0o644); err != nil {
		w.t.Fatal(err)
	}
}

// conflistFromExample writes conf/examples/<example> as network name, with the node-wide
// parts (bridge name, subnet, IPAM data dir, state dir) moved to the test's own and the
// metaconceal keys overridden.
func (w *world) conflistFromExample(example, name, bridge, subnet string, metaconceal map[string]any) {
	w.t.Helper()
	data, err := os.ReadFile(filepath.Join(exampleDir, example))
	if err != nil {
		w.t.Fatal(err)
	}
	var list map[string]any
	if err := json.Unmarshal(data, &list); err != nil {
		w.t.Fatal(err)
	}
	list["name"] = name
	for _, p := range list["plugins"].([]any) {
		plugin := p.(map[string]any)
		switch plugin["type"] {
		case "bridge":
			plugin["bridge"] = bridge
			plugin["ipMasq"] = false // no masquerade rules in the node netns needed or wanted
			ipam := plugin["ipam"].(map[string]any)
			ipam["ranges"] = [][]map[string]string{{{"subnet": subnet}}}
			ipam["dataDir"] = filepath.Join(w.tmp, name+"-ipam")
		case "metaconceal":
			plugin["stateDir"] = filepath.Join(w.tmp, name+"-state")
			for k, v := range metaconceal {
				plugin[k] = v
			}
		}
	}
	out, err := json.Marshal(list)
	if err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.confDir, name+".conflist"), out, 0o644); err != nil {
		w.t.Fatal(err)
	}
}

// add runs `cnitool add` and, once it succeeded, registers a `cnitool del` cleanup so a
// failed assertion later leaves no libcni cache entry, rule or state record behind. DEL
// is idempotent: the explicit DELs the tests make first do not upset it.
func (w *world) add(t *testing.T, network, podPath string) error {
	t.Helper()
	if _, err := w.cnitool("add", network, podPath); err != nil {
		return err
	}
	t.Cleanup(func() {
		if _, err := w.cnitool("del", network, podPath); err != nil {
			t.Errorf("cleanup: cnitool del %s %s: %v", network, podPath, err)
		}
	})
	return nil
}

// cnitool runs cnitool inside the node netns, as a runtime on the node would.
func (w *world) cnitool(verb, network, podPath string) (string, error) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bin := filepath.Join(strings.Split(cniPath, string(os.PathListSeparator))[1], "cnitool")
	return w.node.Exec(ctx, "env", "CNI_PATH="+cniPath, "NETCONFPATH="+w.confDir,
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME="+filepath.Base(podPath)+";K8S_POD_UID=uid-"+filepath.Base(podPath),
		bin, verb, network, podPath)
}

func get(nsPath, url string) (string, error) {
	resp, err := simnode.HTTPClientIn(nsPath, 5*time.Second).Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// udpEcho sends one datagram from the netns and waits for the echo.
func udpEcho(nsPath, addr string) error {
	conn, err := simnode.DialIn(nsPath, "udp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return err
	}
	if _, err := conn.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 16)
	n, err := conn.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != "ping" {
		return fmt.Errorf("echo %q", buf[:n])
	}
	return nil
}

// icmpEcho sends one ICMP echo request from the netns (raw socket) and waits for the
// reply.
func icmpEcho(nsPath, addr string) error {
	conn, err := simnode.DialIn(nsPath, "ip4:icmp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return err
	}
	req := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1, 'm', 'c'} // echo request, id 0x1234, seq 1
	sum := 0
	for i := 0; i < len(req); i += 2 {
		sum += int(req[i])<<8 | int(req[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	req[2], req[3] = byte(^sum>>8), byte(^sum)
	if _, err := conn.Write(req); err != nil {
		return err
	}
	ipConn, ok := conn.(*net.IPConn)
	if !ok {
		return fmt.Errorf("dial ip4:icmp gave %T", conn)
	}
	buf := make([]byte, 1500)
	for {
		n, _, err := ipConn.ReadFrom(buf) // ReadFrom, unlike Read, strips the IPv4 header
		if err != nil {
			return err
		}
		if n >= 8 && buf[0] == 0 && buf[4] == 0x12 && buf[5] == 0x34 { // echo reply to our id
			return nil
		}
	}
}

func iptablesSaveAll(t *testing.T, podName string) string {
	t.Helper()
	var all strings.Builder
	for _, prog := range []string{"iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"} {
		out, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, prog)
		if err != nil {
			t.Fatal(err)
		}
		all.WriteString(out)
	}
	return all.String()
}

func TestCNIToolEndToEnd(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save")
	w := newWorld(t)
	w.conflistFromExample("10-metaconceal.conflist", "mc-secure", "mcbr0", "10.99.1.0/24", nil)
	w.conflistFromExample("10-metaconceal.conflist", "mc-secure-legacy", "mcbr2", "10.99.3.0/24", map[string]any{"iptablesBackend": "legacy"})
	w.conflist("mc-exposed", "mcbr1", "10.99.2.0/24", map[string]any{"mode": "EXPOSED"})
	metadataURL := "http://" + simnode.MetadataIP + "/"

	// The node itself reaches the metadata address: nothing here runs on the node.
	if got, err := get(w.node.Path, metadataURL); err != nil || got != simnode.MetadataIP+":80" {
		t.Fatalf("from the node: %q, %v; want served by %s:80", got, err, simnode.MetadataIP)
	}
	// STATUS: the proxy listens in the node netns.
	if _, err := w.cnitool("status", "mc-secure", w.node.Path); err != nil {
		t.Errorf("cnitool status with the proxy listening: %v", err)
	}

	for _, network := range []string{"mc-secure", "mc-secure-legacy"} {
		t.Run("SECURE/"+network, func(t *testing.T) {
			podName, podPath, err := w.node.NewPodNS("mc-cni-pod")
			if err != nil {
				t.Fatal(err)
			}
			if err := w.add(t, network, podPath); err != nil {
				t.Fatalf("cnitool add: %v", err)
			}
			// The rules are where the network's backend puts them: auto follows iptables-save.
			save := map[string]string{"mc-secure": "iptables-save", "mc-secure-legacy": "iptables-legacy-save"}[network]
			if out, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, save); err != nil || strings.Count(out, "-j METACONCEAL-") != 2 {
				t.Errorf("%s in the pod after add (%v):\n%s", save, err, out)
			}
			if got, err := get(podPath, metadataURL); err != nil || got != simnode.ProxyIP+":988" {
				t.Errorf("pod GET %s: %q, %v; want it to land on the proxy %s:988", metadataURL, got, err, simnode.ProxyIP)
			}
			if got, err := get(podPath, "http://"+simnode.ProxyIP+":988/"); err != nil || got != simnode.ProxyIP+":988" {
				t.Errorf("pod to the proxy directly: %q, %v", got, err)
			}
			start := time.Now()
			_, err = simnode.DialIn(podPath, "tcp", simnode.MetadataIP+":8080", 3*time.Second)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				// DNATed to the ALTS relay address, where nothing listens in this world
				// (gcenet_test.go has the relay).
				t.Errorf("pod TCP to %s:8080 = %v, want connection refused", simnode.MetadataIP, err)
			} else {
				t.Logf("TCP to :8080 refused after %v", time.Since(start))
			}
			// A locally generated datagram that OUTPUT rejects fails the send with EPERM; the
			// ICMP error, when it arrives first, shows as ECONNREFUSED.
			if err := udpEcho(podPath, simnode.MetadataIP+":5353"); !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("pod UDP to %s:5353 = %v, want it rejected (EPERM or connection refused)", simnode.MetadataIP, err)
			}
			if err := icmpEcho(podPath, simnode.MetadataIP); !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("pod ping of %s = %v, want it rejected", simnode.MetadataIP, err)
			}
			recs, err := state.List(filepath.Join(w.tmp, network+"-state"))
			// HostIf: the bridge plugin's host veth, which the host guard's anti-spoofing
			// rules match exposed pods' traffic on.
			if err != nil || len(recs) != 1 || recs[0].PodNamespace != "e2e" || len(recs[0].IPs) != 1 || !strings.HasPrefix(recs[0].IPs[0], "10.99.") ||
				!strings.HasPrefix(recs[0].HostIf, "veth") {
				t.Errorf("state records after add: %+v, %v", recs, err)
			}
			if _, err := w.cnitool("check", network, podPath); err != nil {
				t.Errorf("cnitool check: %v", err)
			}
			// The node keeps direct access while the pod is concealed.
			if got, err := get(w.node.Path, metadataURL); err != nil || got != simnode.MetadataIP+":80" {
				t.Errorf("from the node with a concealed pod: %q, %v", got, err)
			}

			if _, err := w.cnitool("del", network, podPath); err != nil {
				t.Fatalf("cnitool del: %v", err)
			}
			// metaconceal's DEL leaves its rules to the netns (which outlives the DEL here,
			// as a held-open one would); bridge's DEL took the interface.
			if saved := iptablesSaveAll(t, podName); strings.Count(saved, "-j METACONCEAL-") != 2 {
				t.Errorf("want the pod's rules left in its netns after del:\n%s", saved)
			}
			if recs, err := state.List(filepath.Join(w.tmp, network+"-state")); err != nil || len(recs) != 0 {
				t.Errorf("state records after del: %+v, %v", recs, err)
			}
			if _, err := w.cnitool("del", network, podPath); err != nil {
				t.Errorf("second cnitool del: %v", err)
			}
		})
	}

	// cnitool gc names no valid attachment: the pod's record goes, its rules stay with
	// its netns (as after DEL), its interface stays (bridge does not implement GC).
	t.Run("GC", func(t *testing.T) {
		podName, podPath, err := w.node.NewPodNS("mc-cni-pod")
		if err != nil {
			t.Fatal(err)
		}
		if err := w.add(t, "mc-secure", podPath); err != nil {
			t.Fatalf("cnitool add: %v", err)
		}
		if saved := iptablesSaveAll(t, podName); !strings.Contains(saved, "METACONCEAL") {
			t.Fatalf("no rules after add:\n%s", saved)
		}
		if _, err := w.cnitool("gc", "mc-secure", podPath); err != nil {
			t.Fatalf("cnitool gc: %v", err)
		}
		if saved := iptablesSaveAll(t, podName); strings.Count(saved, "-j METACONCEAL-") != 2 {
			t.Errorf("gc changed the pod's rules, which it leaves to the netns:\n%s", saved)
		}
		if recs, err := state.List(filepath.Join(w.tmp, "mc-secure-state")); err != nil || len(recs) != 0 {
			t.Errorf("state records after gc: %+v, %v", recs, err)
		}
		if _, err := w.cnitool("del", "mc-secure", podPath); err != nil {
			t.Errorf("cnitool del after gc: %v", err)
		}
	})

	t.Run("EXPOSED", func(t *testing.T) {
		podName, podPath, err := w.node.NewPodNS("mc-cni-pod")
		if err != nil {
			t.Fatal(err)
		}
		if err := w.add(t, "mc-exposed", podPath); err != nil {
			t.Fatalf("cnitool add: %v", err)
		}
		if got, err := get(podPath, metadataURL); err != nil || got != simnode.MetadataIP+":80" {
			t.Errorf("EXPOSED pod GET: %q, %v; want the metadata address itself", got, err)
		}
		if conn, err := simnode.DialIn(podPath, "tcp", simnode.MetadataIP+":8080", 3*time.Second); err != nil {
			t.Errorf("EXPOSED pod TCP :8080: %v", err)
		} else {
			conn.Close()
		}
		if err := udpEcho(podPath, simnode.MetadataIP+":5353"); err != nil {
			t.Errorf("EXPOSED pod UDP echo: %v", err)
		}
		if err := icmpEcho(podPath, simnode.MetadataIP); err != nil {
			t.Errorf("EXPOSED pod ping: %v", err)
		}
		if saved := iptablesSaveAll(t, podName); strings.Contains(saved, "METACONCEAL") {
			t.Errorf("EXPOSED installed rules:\n%s", saved)
		}
		if _, err := w.cnitool("del", "mc-exposed", podPath); err != nil {
			t.Fatalf("cnitool del: %v", err)
		}
	})
}
