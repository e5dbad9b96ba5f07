package simnode

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// In runs fn on a thread switched into the netns at nsPath (ns.WithNetNSPath): a socket
// created or a process started inside fn belongs to that netns, also after fn returns.
func In(nsPath string, fn func() error) error {
	if nsPath == "" {
		return errors.New("simnode: empty netns path")
	}
	return ns.WithNetNSPath(nsPath, func(ns.NetNS) error { return fn() })
}

// Listen opens a listener inside the node netns; serve it from any goroutine.
func (n *Node) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := In(n.Path, func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("simnode: listen %s %s in %s: %w", network, address, n.Name, err)
	}
	return ln, nil
}

// ListenPacket opens a packet socket (e.g. UDP) inside the node netns.
func (n *Node) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := In(n.Path, func() error {
		var err error
		pc, err = net.ListenPacket(network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("simnode: listen %s %s in %s: %w", network, address, n.Name, err)
	}
	return pc, nil
}

// DialContextIn returns a DialContext for http.Transport that creates every
// connection inside the netns at nsPath. Address literals only: a name would be
// resolved by a goroutine outside the netns.
func DialContextIn(nsPath string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var conn net.Conn
		err := In(nsPath, func() error {
			var err error
			conn, err = (&net.Dialer{}).DialContext(ctx, network, address)
			return err
		})
		return conn, err
	}
}

// DialIn dials from inside the netns at nsPath with a timeout.
func DialIn(nsPath, network, address string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return DialContextIn(nsPath)(ctx, network, address)
}

// HTTPClientIn returns an HTTP client whose connections are made inside the netns at
// nsPath, without keep-alives (each request dials anew) and with a timeout.
func HTTPClientIn(nsPath string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout:   timeout,
		Transport: &http.Transport{DialContext: DialContextIn(nsPath), DisableKeepAlives: true, Proxy: nil},
	}
}
