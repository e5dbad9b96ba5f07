package main

import (
	"context"
	"flag"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"runtime/pprof"
	"time"

	"github.com/metaconceal/metaconceal/pkg/policy"
	"github.com/metaconceal/metaconceal/pkg/proxy"
)

func main() {
	listen := flag.String("listen", "", "")
	up := flag.String("upstream", "", "")
	prof := flag.String("prof", "/tmp/h2cpu.prof", "")
	dur := flag.Duration("dur", 8*time.Second, "")
	flag.Parse()
	u, _ := url.Parse(*up)
	pol, _ := policy.New(policy.Config{})
	h, _ := proxy.New(proxy.Config{Upstream: u, Policy: pol, Log: slog.Default()})
	ln, err := proxy.Listen(context.Background(), *listen)
	if err != nil {
		panic(err)
	}
	f, _ := os.Create(*prof)
	pprof.StartCPUProfile(f)
	go func() { time.Sleep(*dur); pprof.StopCPUProfile(); f.Close(); os.Exit(0) }()
	http.Serve(ln, h)
}
