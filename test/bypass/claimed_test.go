package bypass

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

// dialFromIn opens a TCP connection from src inside the netns at nsPath.
func dialFromIn(nsPath string, src netip.Addr, dst string) (net.Conn, error) {
	var c net.Conn
	err := simnode.In(nsPath, func() error {
		var err error
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		c, err = d.Dial("tcp", dst)
		return err
	})
	return c, err
}

const clusterName = "/computeMetadata/v1/instance/attributes/cluster-name"

// TestClaimedAddressesDoNotMultiplyBudgets (issue 17): a pod that claims 40 more
// addresses of its subnet on its bridge port (ip addr add in its netns; the node's ARP
// finds it) floods distinct long polls and requests from all 41. Its recorded address
// is attested and the other 40 are unattributed, so it holds at most two pods' worth
// of long polls; another pod's distinct long poll is held to its timeout and answered
// 200, and its requests at 20 per second all succeed. The caps are scaled down (64
// upstream long polls, 8 per pod) so that the flood is 164 polls. Keyed by source
// address, as before, each of the 41 addresses had a budget of its own and the flood
// took the whole node-wide cap: the other pod's poll was refused (503).
func TestClaimedAddressesDoNotMultiplyBudgets(t *testing.T) {
	t.Cleanup(func() { assertHostUntouched(t) })
	t.Parallel()
	limits := proxy.DefaultLimits
	limits.MaxUpstreamLongPolls, limits.PodMaxLongPolls = 64, 8
	w := newWorld(t, func(c *proxy.Config) { c.Limits = limits })
	victim, atk := w.addPod("fvi", "10.251.0.2"), w.addPod("fat", "10.251.0.3")
	srcs := []netip.Addr{atk.ip}
	for i := range 40 {
		a := netip.AddrFrom4([4]byte{10, 251, 0, byte(100 + i)})
		if _, err := simnode.Run(context.Background(), "ip", "-n", atk.name, "addr", "add", a.String()+"/24", "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
		srcs = append(srcs, a)
	}
	w.installGuard()
	w.record(victim, "")
	w.record(atk, "")
	w.refresh()

	req, err := http.NewRequest("GET", "http://"+metadataAddr.String()+clusterName, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := simnode.HTTPClientIn(victim.path, 5*time.Second).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	etag := resp.Header.Get("ETag")
	if resp.StatusCode != http.StatusOK || etag == "" {
		t.Fatalf("victim's first request: %d, ETag %q", resp.StatusCode, etag)
	}
	poll := func(sec int) string {
		return fmt.Sprintf("%s?wait_for_change=true&last_etag=%s&timeout_sec=%d", clusterName, etag, sec)
	}

	// The flood: 4 distinct long polls from each of the 41 addresses, held open.
	var (
		mu       sync.Mutex
		statuses = map[string]int{}
		conns    []net.Conn
		wg       sync.WaitGroup
	)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	})
	n := 0
	for _, src := range srcs {
		for range 4 {
			n++
			c, err := dialFromIn(atk.path, src, metadataAddr.String())
			if err != nil { // refused: fine, the flood goes on
				mu.Lock()
				statuses["dial: "+err.Error()[strings.LastIndex(err.Error(), ": ")+2:]]++
				mu.Unlock()
				continue
			}
			conns = append(conns, c)
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: metadata.google.internal\r\nMetadata-Flavor: Google\r\n\r\n", poll(100+n))
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					statuses["closed"]++
					return
				}
				resp.Body.Close()
				statuses[resp.Status]++
			}()
		}
	}
	// Let the refusals come back; what stays is held upstream.
	time.Sleep(time.Second)
	mu.Lock()
	t.Logf("flood of %d long polls from %d addresses: %d held upstream, answered at once: %v", n, len(srcs), w.fake.Waiting(), statuses)
	mu.Unlock()

	// Meanwhile the attacker floods requests from all its addresses.
	stop := make(chan struct{})
	var floodAnswers atomic.Int64
	for _, src := range srcs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialFromIn(atk.path, src, metadataAddr.String())
			if err != nil {
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			for {
				select {
				case <-stop:
					return
				default:
				}
				fmt.Fprintf(c, "GET /computeMetadata/v1/project/project-id HTTP/1.1\r\nHost: x\r\nMetadata-Flavor: Google\r\n\r\n")
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					return
				}
				resp.Body.Close()
				if resp.Header.Get("Connection") == "close" {
					return
				}
				floodAnswers.Add(1)
			}
		}()
	}

	// The victim: one distinct long poll held to its timeout, and 20 requests a second.
	pollDone := make(chan error, 1)
	go func() {
		code, body := w.get(victim, poll(3))
		if code != http.StatusOK {
			pollDone <- fmt.Errorf("victim's long poll: %d %q; want 200 at its timeout", code, firstLine(body))
			return
		}
		pollDone <- nil
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	failed := 0
	for i := range 60 {
		<-tick.C
		if code, body := w.get(victim, "/computeMetadata/v1/project/project-id"); code != http.StatusOK {
			failed++
			t.Errorf("victim's request %d during the flood: %d %q", i, code, firstLine(body))
		}
	}
	tick.Stop()
	if err := <-pollDone; err != nil {
		t.Error(err)
	}
	close(stop)
	t.Logf("victim: 60 requests at 20/s, %d failed; attacker's flood answered %d requests", failed, floodAnswers.Load())
}
