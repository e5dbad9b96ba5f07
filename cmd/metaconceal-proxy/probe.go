package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// runProbe is `metaconceal-proxy probe [--socket PATH] [--path /readyz]`, the
// DaemonSet's exec probe: one GET of path on this instance's --probe-socket, exit 0 on
// 200. During a rolling update two proxies share the TCP metrics address
// (SO_REUSEPORT), so an HTTP probe there may reach the other pod; the socket is in the
// pod's own emptyDir.
func runProbe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("metaconceal-proxy probe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "/tmp/metaconceal-proxy.sock", "the proxy's --probe-socket")
	path := fs.String("path", "/readyz", "what to ask: /readyz or /healthz")
	timeout := fs.Duration("timeout", 2*time.Second, "limit for the answer")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "metaconceal-proxy probe: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	client := &http.Client{Timeout: *timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", *socket)
		},
	}}
	resp, err := client.Get("http://probe" + *path)
	if err != nil {
		fmt.Fprintf(stderr, "metaconceal-proxy probe: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "metaconceal-proxy probe: %s: %s", resp.Status, body)
		return 1
	}
	fmt.Fprintf(stdout, "%s", body)
	return 0
}
