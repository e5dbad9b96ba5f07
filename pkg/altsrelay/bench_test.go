package altsrelay

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"testing"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// blindRelay is what the relay was before it filtered: bytes copied both ways.
func blindRelay(b *testing.B, upstream string) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", upstream)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); _ = up.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return ln.Addr().String()
}

// BenchmarkHandshakerExchange measures one handshaker exchange (a gRPC call over h2c
// with one message each way: what grpc-go's ALTS client does per handshake step) to
// the fake stand-in on loopback: directly, through a blind byte relay (the relay
// before it filtered), and through the filtering relay; on a connection kept open
// (frames inspected only) and on a new connection per call (preface read, upstream
// dialed after it, first HEADERS checked).
//
//	go test -run '^$' -bench HandshakerExchange -benchtime 3000x -count 3 ./pkg/altsrelay/
func BenchmarkHandshakerExchange(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	s := &fakegce.Services{}
	s.ServeALTS(ln)
	b.Cleanup(func() { _ = s.Close() })
	r, err := New(Config{Upstream: ln.Addr().String(), MaxPerPod: 1 << 20, MaxConns: 1 << 20})
	if err != nil {
		b.Fatal(err)
	}
	rln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = r.Serve(rln) }()
	b.Cleanup(func() { r.Close() })
	targets := []struct{ name, addr string }{
		{"direct", ln.Addr().String()},
		{"blind-relay", blindRelay(b, ln.Addr().String())},
		{"filtering-relay", rln.Addr().String()},
	}
	msg := fakegce.GRPCMessage("client hello")
	for _, conn := range []struct {
		name      string
		keepAlive bool
	}{{"open-conn", true}, {"new-conn", false}} {
		for _, tg := range targets {
			b.Run(conn.name+"/"+tg.name, func(b *testing.B) {
				var protocols http.Protocols
				protocols.SetUnencryptedHTTP2(true)
				tr := &http.Transport{Protocols: &protocols, DisableKeepAlives: !conn.keepAlive}
				defer tr.CloseIdleConnections()
				client := &http.Client{Transport: tr}
				call := func() {
					req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, "http://"+tg.addr+fakegce.ALTSHandshakerPath, bytes.NewReader(msg))
					if err != nil {
						b.Fatal(err)
					}
					req.Header.Set("Content-Type", "application/grpc")
					req.Header.Set("TE", "trailers")
					resp, err := client.Do(req)
					if err != nil {
						b.Fatal(err)
					}
					got, err := fakegce.ReadGRPCMessage(resp.Body)
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err != nil || string(got) != fakegce.ALTSHandshakerAnswer {
						b.Fatalf("answer %q, %v", got, err)
					}
				}
				call() // warm: the open connection exists before the clock starts
				b.ResetTimer()
				for b.Loop() {
					call()
				}
			})
		}
	}
}
