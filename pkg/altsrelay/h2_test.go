package altsrelay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
)

// Test helpers that speak HTTP/2 by hand (x/net/http2's Framer and hpack), for what a
// regular client does not do: several streams on one connection at chosen moments,
// trailers, bad frames, silence.

// request is one HEADERS frame's fields.
type request struct {
	method, path, contentType string
	extra                     []hpack.HeaderField
}

var handshakerCall = request{method: "POST", path: fakegce.ALTSHandshakerPath, contentType: "application/grpc"}

// h2frames writes HTTP/2 frames as a client does, to a buffer or a connection.
type h2frames struct {
	w    io.Writer
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func newH2Frames(w io.Writer) *h2frames {
	h := &h2frames{w: w, fr: http2.NewFramer(w, nil)}
	h.enc = hpack.NewEncoder(&h.hbuf)
	return h
}

// preface writes the client preface and an empty SETTINGS frame.
func (h *h2frames) preface() error {
	if _, err := io.WriteString(h.w, http2.ClientPreface); err != nil {
		return err
	}
	return h.fr.WriteSettings()
}

// headers writes req as the HEADERS of stream id; maxFrag > 0 splits the header
// block into CONTINUATION frames of that size.
func (h *h2frames) headers(id uint32, req request, endStream bool, maxFrag int) error {
	h.hbuf.Reset()
	fields := []hpack.HeaderField{{Name: ":method", Value: req.method}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: req.path}, {Name: ":authority", Value: "metadata.google.internal:8080"}}
	if req.contentType != "" {
		fields = append(fields, hpack.HeaderField{Name: "content-type", Value: req.contentType})
	}
	fields = append(fields, hpack.HeaderField{Name: "te", Value: "trailers"})
	fields = append(fields, req.extra...)
	for _, f := range fields {
		if err := h.enc.WriteField(f); err != nil {
			return err
		}
	}
	block := h.hbuf.Bytes()
	if maxFrag <= 0 || maxFrag >= len(block) {
		return h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndStream: endStream, EndHeaders: true})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:maxFrag], EndStream: endStream}); err != nil {
		return err
	}
	for rest := block[maxFrag:]; len(rest) > 0; {
		n := min(maxFrag, len(rest))
		if err := h.fr.WriteContinuation(id, n == len(rest), rest[:n]); err != nil {
			return err
		}
		rest = rest[n:]
	}
	return nil
}

// call writes a whole gRPC call on stream id: HEADERS and one message, ending the stream.
func (h *h2frames) call(id uint32, req request, msg string) error {
	if err := h.headers(id, req, false, 0); err != nil {
		return err
	}
	return h.fr.WriteData(id, true, fakegce.GRPCMessage(msg))
}

// rawCall is a whole connection's bytes: preface, SETTINGS, then a call per request.
func rawCall(reqs ...request) []byte {
	var b bytes.Buffer
	h := newH2Frames(&b)
	if err := h.preface(); err != nil {
		panic(err)
	}
	for i, r := range reqs {
		if err := h.call(uint32(2*i+1), r, "client hello"); err != nil {
			panic(err)
		}
	}
	return b.Bytes()
}

// h2conn is a client connection spoken by hand.
type h2conn struct {
	*h2frames
	c  net.Conn
	rd *http2.Framer
}

func newH2Conn(t *testing.T, c net.Conn) *h2conn {
	t.Helper()
	h := &h2conn{h2frames: newH2Frames(c), c: c, rd: http2.NewFramer(nil, c)}
	h.rd.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := h.preface(); err != nil {
		t.Fatal(err)
	}
	return h
}

// answer reads frames until stream id ends and returns its DATA, acknowledging the
// server's SETTINGS on the way; a connection that ends first is an error.
func (h *h2conn) answer(id uint32) (string, error) {
	var body bytes.Buffer
	for {
		f, err := h.rd.ReadFrame()
		if err != nil {
			return body.String(), err
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := h.fr.WriteSettingsAck(); err != nil {
					return body.String(), err
				}
			}
		case *http2.DataFrame:
			if f.StreamID == id {
				body.Write(f.Data())
			}
			if f.StreamID == id && f.StreamEnded() {
				return body.String(), nil
			}
		case *http2.MetaHeadersFrame:
			if f.StreamID == id && f.StreamEnded() {
				return body.String(), nil
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return body.String(), fmt.Errorf("stream %d reset: %v", id, f.ErrCode)
			}
		case *http2.GoAwayFrame:
			return body.String(), fmt.Errorf("GOAWAY: %v", f.ErrCode)
		}
	}
}

// exchange makes a whole call on stream id and returns its answer message.
func (h *h2conn) exchange(id uint32) (string, error) {
	if err := h.call(id, handshakerCall, "client hello"); err != nil {
		return "", err
	}
	body, err := h.answer(id)
	if err != nil {
		return "", err
	}
	msg, err := fakegce.ReadGRPCMessage(bytes.NewReader([]byte(body)))
	return string(msg), err
}

// closedByPeer waits for the connection to end and reports whether it did.
func closedByPeer(c net.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		var ne net.Error
		switch {
		case err == nil:
		case errors.As(err, &ne) && ne.Timeout():
			return fmt.Errorf("still open after 10s")
		default:
			return nil // EOF or reset
		}
	}
}

// countingListener counts the connections it accepted.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// standIn starts the fake GCE server's ALTS stand-in on loopback.
func standIn(t *testing.T) (*fakegce.Services, *countingListener) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: ln}
	s := &fakegce.Services{}
	s.ServeALTS(cl)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s, cl
}
