package simnode

import (
	"context"
	"fmt"
	"io"
	"net/http"
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
