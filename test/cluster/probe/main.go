// Command probe is the cluster e2e's test workload (in the probe image, beside a
// busybox shell). It asks the metadata server the way a pod's client would and prints
// what came back as JSON, for the scenarios to read through `kubectl exec` / `logs`:
//
//	probe idle                         block until SIGTERM (the pod's main process)
//	probe get [-H 'Name: value'] URL   one GET, one JSON line {"status","body","leak","err"}
//	probe loop -interval 100ms URL     a GET every interval, one JSON line each, with "t"
//	probe clients -interval 20ms -poll POLLURL URL
//	                                   what clients feel during an upgrade, three at once,
//	                                   one JSON line per answer with "c" naming the client:
//	                                   "new" GETs URL on a new connection every interval,
//	                                   "ka" GETs URL every interval on one keep-alive
//	                                   connection (re-dialled by net/http when closed),
//	                                   "poll" holds a long poll on POLLURL (wait_for_change
//	                                   with the last ETag, as Google's client libraries
//	                                   do) and polls again after each answer
//	probe alts HOST:PORT               the ALTS handshaker call, then each request a relay
//	                                   carrying only ALTS must not pass; one JSON line each
//	                                   {"name","answered","body","err"}
//
// Every request carries Metadata-Flavor: Google and, but for the "ka" and "poll"
// clients of `probe clients`, its own connection (no keep-alive), so each one goes
// through the pod's rules anew.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// Line is one printed result.
type Line struct {
	T      int64  `json:"t,omitempty"`   // Unix milliseconds at the request's start (loop)
	End    int64  `json:"end,omitempty"` // Unix milliseconds at the answer (clients)
	C      string `json:"c,omitempty"`   // which client asked (clients)
	ETag   string `json:"etag,omitempty"`
	Status int    `json:"status"` // HTTP status; 0 when no answer
	Body   string `json:"body"`   // the first 200 bytes
	// Leak: the whole body holds the fake metadata server's kube-env or identity-token
	// marker, i.e. a concealed answer got through.
	Leak bool   `json:"leak"`
	Err  string `json:"err,omitempty"`
	// Where the time of a request went (clients), in milliseconds from its start: the
	// connection established (0 for a reused one), the request written, the first
	// byte of the answer read.
	Conn  int64 `json:"conn,omitempty"`
	Wrote int64 `json:"wrote,omitempty"`
	First int64 `json:"first,omitempty"`
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: probe idle | get URL | loop [-interval D] URL")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	client := &http.Client{
		Timeout:   3 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	}
	switch args[0] {
	case "idle":
		<-ctx.Done()
		return 0
	case "get":
		fs := flag.NewFlagSet("get", flag.ContinueOnError)
		var headers headerList
		fs.Var(&headers, "H", "extra request header `Name: value`; repeatable")
		if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 1 {
			fmt.Fprintln(os.Stderr, "usage: probe get [-H 'Name: value']... URL")
			return 2
		}
		return emit(get(ctx, client, fs.Arg(0), headers...))
	case "loop":
		fs := flag.NewFlagSet("loop", flag.ContinueOnError)
		interval := fs.Duration("interval", 100*time.Millisecond, "time between request starts")
		if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 1 {
			fmt.Fprintln(os.Stderr, "usage: probe loop [-interval D] URL")
			return 2
		}
		tick := time.NewTicker(*interval)
		defer tick.Stop()
		for {
			start := time.Now()
			l := get(ctx, client, fs.Arg(0))
			l.T = start.UnixMilli()
			if rc := emit(l); rc != 0 {
				return rc
			}
			select {
			case <-ctx.Done():
				return 0
			case <-tick.C:
			}
		}
	case "clients":
		fs := flag.NewFlagSet("clients", flag.ContinueOnError)
		interval := fs.Duration("interval", 20*time.Millisecond, "time between request starts of the new-connection and the keep-alive client")
		pollURL := fs.String("poll", "", "URL of the held long poll (wait_for_change is added)")
		if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 1 || *pollURL == "" {
			fmt.Fprintln(os.Stderr, "usage: probe clients [-interval D] -poll URL URL")
			return 2
		}
		return clients(ctx, *interval, *pollURL, fs.Arg(0))
	case "alts":
		if len(args) != 2 {
			fmt.Fprintln(os.Stderr, "usage: probe alts HOST:PORT")
			return 2
		}
		return altsProbes(ctx, args[1])
	default:
		fmt.Fprintf(os.Stderr, "probe: unknown mode %q\n", args[0])
		return 2
	}
}

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

func get(ctx context.Context, client *http.Client, url string, headers ...string) Line {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Line{Err: err.Error()}
	}
	req.Header.Set("Metadata-Flavor", "Google")
	for _, h := range headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok {
			return Line{Err: fmt.Sprintf("header %q: want Name: value", h)}
		}
		req.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	var conn, wrote, first int64
	start := time.Now()
	since := func() int64 { return max(1, time.Since(start).Milliseconds()) }
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		ConnectDone:          func(string, string, error) { conn = since() },
		WroteRequest:         func(httptrace.WroteRequestInfo) { wrote = since() },
		GotFirstResponseByte: func() { first = since() },
	}))
	resp, err := client.Do(req)
	if err != nil {
		return Line{Err: err.Error(), Conn: conn, Wrote: wrote, First: first}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	l := Line{
		ETag:   resp.Header.Get("ETag"),
		Status: resp.StatusCode,
		Body:   string(body[:min(len(body), 200)]),
		Leak:   bytes.Contains(body, []byte(fakegce.KubeEnvMarker)) || bytes.Contains(body, []byte(fakegce.IdentityTokenMarker)),
		Conn:   conn, Wrote: wrote, First: first,
	}
	if err != nil {
		l.Err = "body: " + err.Error()
	}
	return l
}

// clients runs the three clients of `probe clients` until ctx is done.
func clients(ctx context.Context, interval time.Duration, pollURL, url string) int {
	var mu sync.Mutex
	out := func(c string, start time.Time, l Line) {
		l.C, l.T, l.End = c, start.UnixMilli(), time.Now().UnixMilli()
		mu.Lock()
		defer mu.Unlock()
		emit(l)
	}
	every := func(c string, client *http.Client) {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			start := time.Now()
			out(c, start, get(ctx, client, url))
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		every("new", &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}})
	}()
	go func() {
		defer wg.Done()
		every("ka", &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1}})
	}()
	go func() {
		defer wg.Done()
		client := &http.Client{Transport: &http.Transport{Proxy: nil}} // held as long as the server wants
		etag := ""
		for ctx.Err() == nil {
			u := pollURL
			if etag != "" {
				u += "?wait_for_change=true&timeout_sec=3600&last_etag=" + etag
			}
			start := time.Now()
			l := get(ctx, client, u)
			if ctx.Err() != nil {
				return // cut by the end of the probe, not an answer
			}
			out("poll", start, l)
			if l.Status == http.StatusOK && l.ETag != "" {
				etag = l.ETag
			} else {
				time.Sleep(interval) // no spin on a failure
			}
		}
	}()
	wg.Wait()
	return 0
}

func emit(l Line) int {
	data, err := json.Marshal(l)
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		return 1
	}
	if _, err := fmt.Println(string(data)); err != nil {
		return 1
	}
	return 0
}

// ALTSLine is one printed result of `probe alts`.
type ALTSLine struct {
	Name     string `json:"name"`
	Answered bool   `json:"answered"` // an answer came back (for a gRPC call: grpc-status 0)
	Body     string `json:"body"`     // the first 200 bytes of the answer
	Err      string `json:"err,omitempty"`
}

// altsProbes sends fakegce's handshaker call and then each of its other probes to
// addr, each on a connection of its own, and prints one ALTSLine per probe.
func altsProbes(ctx context.Context, addr string) int {
	var d net.Dialer
	for _, p := range append([]fakegce.ALTSProbe{fakegce.ALTSHandshakerCall}, fakegce.ALTSOtherProbes...) {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		body, err := p.Do(pctx, d.DialContext, addr)
		cancel()
		l := ALTSLine{Name: p.Name, Answered: err == nil, Body: body[:min(len(body), 200)]}
		if err != nil {
			l.Err = err.Error()
		}
		data, err := json.Marshal(l)
		if err != nil {
			fmt.Fprintln(os.Stderr, "probe:", err)
			return 1
		}
		fmt.Println(string(data))
	}
	return 0
}
