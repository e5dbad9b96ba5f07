package simnode

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// GetWhenUp GETs url from inside the netns at nsPath, retrying every 100 ms while the
// server is not up yet (connection refused, or not a 200), until ctx is done or exited
// is closed (the server's process ended); it returns the body of the first 200.
func GetWhenUp(ctx context.Context, nsPath, url string, exited <-chan struct{}) (string, error) {
	client := HTTPClientIn(nsPath, 2*time.Second)
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return "", err
		}
		resp, err := client.Do(req)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(body), nil
			}
			err = fmt.Errorf("%s: %s, %v", url, resp.Status, rerr)
		}
		last = err
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("%s not up: %w (last: %v)", url, ctx.Err(), last)
		case <-exited:
			return "", fmt.Errorf("%s: the server exited (last: %v)", url, last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// GetFromServer starts the server program bin with args inside the node netns, GETs
// url from there once it answers 200 (GetWhenUp, up to 30 s), stops the server
// (SIGTERM) and returns the body; on failure the error carries the server's output.
func (n *Node) GetFromServer(bin string, args []string, url string) (string, error) {
	logs, err := os.CreateTemp("", "simnode-server-*.log") // a file: readable while the process runs
	if err != nil {
		return "", err
	}
	defer os.Remove(logs.Name())
	defer logs.Close()
	cmd := n.Command(context.Background(), bin, args...)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		return "", err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }() // the exit is reported through exited
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	body, err := GetWhenUp(ctx, n.Path, url, exited)
	cancel()
	_ = cmd.Process.Signal(syscall.SIGTERM) // it may have exited already
	<-exited
	if err != nil {
		out, _ := os.ReadFile(logs.Name()) // best effort, for the message
		return "", fmt.Errorf("%w\n%s output:\n%s", err, filepath.Base(bin), out)
	}
	return body, nil
}
