// Package kubeapi runs a real Kubernetes control plane for integration tests: etcd and
// kube-apiserver (the binaries the cluster e2e builds from k8s.io/kubernetes into
// bin/cluster, `make cluster-tools`), inside a network namespace of their own, with
// per-run certificates. Clients reach it through dialers that enter that netns; nothing
// listens in, or is sent from, the machine's own netns. Everything is stopped and
// removed by the test's cleanup.
package kubeapi

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// Address of the API server inside its netns.
const (
	apiIP    = "10.250.0.1" // on the netns's lo: the API server refuses a loopback advertise address
	apiAddr  = apiIP + ":6443"
	etcdURL  = "http://127.0.0.1:2379"
	etcdPeer = "http://127.0.0.1:2380"
)

// Server is a running etcd + kube-apiserver.
type Server struct {
	Node *simnode.Node // the netns they run in; tests may use it as a node's netns
	Dir  string
	ca   []byte
	// admin client certificate (system:masters)
	adminCert, adminKey []byte
}

// Start runs etcd and kube-apiserver from $METACONCEAL_BIN/cluster and waits until the
// API server is ready; t's cleanup stops both and removes the netns.
func Start(t testing.TB) *Server {
	t.Helper()
	testutil.RequirePrivileged(t, "ip", "nsenter")
	bin, err := testutil.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	etcd, apiserver := filepath.Join(bin, "cluster", "etcd"), filepath.Join(bin, "cluster", "kube-apiserver")
	for _, p := range []string{etcd, apiserver} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%v: build the control plane binaries first (make cluster-tools, test/cluster)", err)
		}
	}
	node, err := simnode.New("mc-kubeapi", apiIP+"/32")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node.Close(); err != nil {
			t.Errorf("remove netns: %v", err)
		}
	})
	s := &Server{Node: node, Dir: t.TempDir()}
	if err := s.writePKI(); err != nil {
		t.Fatal(err)
	}
	logs := filepath.Join(s.Dir, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		t.Fatal(err)
	}
	etcdDone := s.start(t, "etcd", etcd, "--name=kubeapi", "--data-dir="+filepath.Join(s.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+etcdPeer, "--initial-advertise-peer-urls="+etcdPeer,
		"--initial-cluster=kubeapi="+etcdPeer, "--log-level=warn")
	apiDone := s.start(t, "kube-apiserver", apiserver,
		"--etcd-servers="+etcdURL, "--bind-address="+apiIP, "--advertise-address="+apiIP, "--secure-port=6443",
		"--cert-dir="+filepath.Join(s.Dir, "apiserver-certs"),
		"--tls-cert-file="+s.path("apiserver.crt"), "--tls-private-key-file="+s.path("apiserver.key"),
		"--client-ca-file="+s.path("ca.crt"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--authorization-mode=Node,RBAC",
		"--service-account-key-file="+s.path("sa.pub"), "--service-account-signing-key-file="+s.path("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--profiling=false", "--v=1")

	client := s.Client(t)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		cancel()
		if err == nil && bytes.Equal(bytes.TrimSpace(body), []byte("ok")) {
			break
		}
		select {
		case <-etcdDone:
			t.Fatalf("etcd exited:\n%s", simnodeTail(filepath.Join(logs, "etcd.log")))
		case <-apiDone:
			t.Fatalf("kube-apiserver exited:\n%s", simnodeTail(filepath.Join(logs, "kube-apiserver.log")))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready after 2m: %v\n%s", err, simnodeTail(filepath.Join(logs, "kube-apiserver.log")))
		}
		time.Sleep(300 * time.Millisecond)
	}
	return s
}

func (s *Server) path(name string) string { return filepath.Join(s.Dir, name) }

// start runs a program in the netns, logging to logs/NAME.log; the cleanup stops it.
// The channel is closed when it exits.
func (s *Server) start(t testing.TB, name, bin string, args ...string) <-chan struct{} {
	t.Helper()
	logPath := filepath.Join(s.Dir, "logs", name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + s.Node.Path, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s log tail:\n%s", name, simnodeTail(logPath))
		}
	})
	return done
}

func simnodeTail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(data) > 3000 {
		data = data[len(data)-3000:]
	}
	return string(data)
}

// base is the rest.Config every client shares: the server, its CA, the netns dialer.
func (s *Server) base() *rest.Config {
	dial := simnode.DialContextIn(s.Node.Path)
	return &rest.Config{
		Host:            "https://" + apiAddr,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.ca},
		Dial:            func(ctx context.Context, network, addr string) (net.Conn, error) { return dial(ctx, network, addr) },
		QPS:             100, Burst: 200,
		Timeout: 30 * time.Second,
	}
}

// AdminConfig is a rest.Config with cluster-admin rights (system:masters).
func (s *Server) AdminConfig() *rest.Config {
	c := s.base()
	c.CertData, c.KeyData = s.adminCert, s.adminKey
	return c
}

// TokenConfig is a rest.Config that authenticates with a bearer token.
func (s *Server) TokenConfig(token string) *rest.Config {
	c := s.base()
	c.BearerToken = token
	return c
}

// Client is an admin clientset.
func (s *Server) Client(t testing.TB) kubernetes.Interface {
	t.Helper()
	return MustClient(t, s.AdminConfig())
}

// MustClient builds a clientset or fails the test.
func MustClient(t testing.TB, cfg *rest.Config) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// writePKI writes a CA, the API server's serving certificate, the admin client
// certificate and the service-account key pair.
func (s *Server) writePKI() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "metaconceal-kubeapi-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	s.ca = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(s.path("ca.crt"), s.ca, 0o600); err != nil {
		return err
	}
	issue := func(serial int64, cn string, orgs []string, server bool) (certPEM, keyPEM []byte, err error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: orgs},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
			tmpl.IPAddresses = []net.IP{net.ParseIP(apiIP), net.ParseIP("10.96.0.1")}
			tmpl.DNSNames = []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
		if err != nil {
			return nil, nil, err
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
	}
	crt, key, err := issue(2, "kube-apiserver", nil, true)
	if err != nil {
		return err
	}
	if err := errors.Join(os.WriteFile(s.path("apiserver.crt"), crt, 0o600), os.WriteFile(s.path("apiserver.key"), key, 0o600)); err != nil {
		return err
	}
	if s.adminCert, s.adminKey, err = issue(3, "metaconceal-admin", []string{"system:masters"}, false); err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	return errors.Join(
		os.WriteFile(s.path("sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}), 0o600),
		os.WriteFile(s.path("sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600),
	)
}
