package altsrelay

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// passed runs the filter over a client's bytes as the relay does and returns what it
// would forward upstream, and how many requests it passed.
func passed(in []byte) (out []byte, requests int) {
	f := newFilter(bytes.NewReader(in))
	if f.preface() != nil {
		return nil, 0
	}
	var b bytes.Buffer
	b.WriteString(http2.ClientPreface)
	for {
		raw, data, err := f.next()
		if err != nil {
			return b.Bytes(), f.requests
		}
		b.Write(raw)
		if data > 0 {
			if _, err := io.CopyN(&b, f.br, data); err != nil {
				return b.Bytes(), f.requests
			}
		}
	}
}

// FuzzFilter: whatever a client sends, what the filter forwards is a prefix of it
// (never a changed byte), and, parsed again on its own, is the HTTP/2 client preface
// followed by frames whose every header block is a gRPC call (POST, one gRPC
// content-type) to a method of the ALTS handshaker service. What has no request is
// never forwarded beyond its preface and SETTINGS-like frames.
func FuzzFilter(f *testing.F) {
	other := request{method: "POST", path: "/grpc.health.v1.Health/Check", contentType: "application/grpc"}
	f.Add(rawCall(handshakerCall))
	f.Add(rawCall(handshakerCall, handshakerCall))
	f.Add(rawCall(handshakerCall, other))
	f.Add(rawCall(other))
	f.Add(rawCall(request{method: "GET", path: "/computeMetadata/v1/instance/attributes/kube-env"}))
	f.Add(rawCall(request{method: "POST", path: fakegce.ALTSHandshakerPath, contentType: "application/json"}))
	f.Add(rawCall(request{method: "POST", path: fakegce.ALTSHandshakerPath + "/../x", contentType: "application/grpc"}))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: metadata.google.internal:8080\r\n\r\n"))
	f.Add([]byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"))
	f.Add([]byte(http2.ClientPreface))
	var split bytes.Buffer
	h := newH2Frames(&split)
	_ = h.preface()
	_ = h.headers(1, handshakerCall, false, 5)
	_ = h.fr.WriteData(1, true, fakegce.GRPCMessage("client hello"))
	_ = h.headers(3, other, true, 3)
	f.Add(split.Bytes())

	f.Fuzz(func(t *testing.T, in []byte) {
		out, requests := passed(in)
		if !bytes.HasPrefix(in, out) {
			t.Fatalf("forwarded bytes are not a prefix of the input")
		}
		if len(out) == 0 {
			return
		}
		if !bytes.HasPrefix(out, []byte(http2.ClientPreface)) {
			t.Fatalf("forwarded %q without the HTTP/2 preface", out[:min(len(out), 32)])
		}
		rest := bytes.NewReader(out[len(http2.ClientPreface):])
		fr := http2.NewFramer(nil, rest)
		fr.SetMaxReadFrameSize(1<<24 - 1)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		fr.ReadMetaHeaders.SetAllowedMaxDynamicTableSize(maxHeaderTable)
		seen := 0
		for {
			fh, err := fr.ReadFrameHeader()
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			if err != nil {
				t.Fatalf("forwarded frames do not parse: %v", err)
			}
			if fh.Type == http2.FrameData {
				// DATA is the server's to check (padding and flow control); skip it.
				if _, err := io.CopyN(io.Discard, rest, int64(fh.Length)); err != nil {
					break // the end, inside the last DATA
				}
				continue
			}
			frame, err := fr.ReadFrameForHeader(fh)
			if err != nil {
				t.Fatalf("forwarded frames do not parse: %v", err)
			}
			switch frame := frame.(type) {
			case *http2.MetaHeadersFrame:
				seen++
				var ctypes []string
				for _, hf := range frame.RegularFields() {
					if hf.Name == "content-type" {
						ctypes = append(ctypes, hf.Value)
					}
				}
				method, path := frame.PseudoValue("method"), frame.PseudoValue("path")
				name, under := strings.CutPrefix(path, "/grpc.gcp.HandshakerService/")
				if method != "POST" || frame.PseudoValue("protocol") != "" || !under || name == "" || strings.ContainsAny(name, "/.%?#") ||
					len(ctypes) != 1 || !strings.HasPrefix(ctypes[0], "application/grpc") || frame.Truncated {
					t.Fatalf("forwarded a request that is not a gRPC call to the handshaker: %s %q content-type %q", method, path, ctypes)
				}
			case *http2.SettingsFrame, *http2.PingFrame, *http2.WindowUpdateFrame,
				*http2.RSTStreamFrame, *http2.PriorityFrame, *http2.GoAwayFrame:
			default:
				t.Fatalf("forwarded a %T", frame)
			}
		}
		if seen != requests {
			t.Fatalf("forwarded %d header blocks, the filter counted %d requests", seen, requests)
		}
	})
}
