package fakegce

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// The ALTS handshaker stand-in on TCP 8080: gRPC-shaped HTTP/2 with prior knowledge
// (h2c), as GCE's handshaker service, which grpc-go's credentials/alts calls at
// /grpc.gcp.HandshakerService/DoHandshake. It also answers HTTP/1.1 and every other
// path, with another marker, so that a test can tell what a relay let through; and
// it records every request it served.

const (
	// ALTSHandshakerPath is the method grpc-go's ALTS handshaker client calls.
	ALTSHandshakerPath = "/grpc.gcp.HandshakerService/DoHandshake"
	// ALTSGreeting starts every answer message of a gRPC call to the handshaker service.
	ALTSGreeting = "MCFAKEALTS handshaker ready"
	// ALTSOtherMarker starts every answer to anything else (another path, HTTP/1.1,
	// a request that is not a gRPC call).
	ALTSOtherMarker = "MCFAKEALTS other path served"
)

// ALTSRequest is one request the stand-in served.
type ALTSRequest struct {
	Proto, Method, Path, ContentType, Remote string
}

func (r ALTSRequest) String() string {
	return fmt.Sprintf("%s %s %s content-type=%q remote=%s", r.Proto, r.Method, r.Path, r.ContentType, r.Remote)
}

// isGRPCCall: HTTP/2, POST, a gRPC content-type.
func isGRPCCall(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	return r.ProtoMajor == 2 && r.Method == http.MethodPost &&
		(ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+") || strings.HasPrefix(ct, "application/grpc;"))
}

// ALTSHandler is the stand-in's handler; seen, if not nil, hears of every request
// before it is answered. A gRPC call answers one message per message it reads,
// ALTSGreeting (ALTSHandshakerPath) or ALTSOtherMarker (another path) followed by
// ": " and the message, then grpc-status 0; anything else gets ALTSOtherMarker as a
// text body.
func ALTSHandler(seen func(ALTSRequest)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen != nil {
			seen(ALTSRequest{Proto: r.Proto, Method: r.Method, Path: r.URL.RequestURI(),
				ContentType: r.Header.Get("Content-Type"), Remote: r.RemoteAddr})
		}
		if !isGRPCCall(r) {
			w.Header().Set("Content-Type", "text/plain")
			_, _ = io.WriteString(w, ALTSOtherMarker+"\n")
			return
		}
		marker := ALTSOtherMarker
		if r.URL.RequestURI() == ALTSHandshakerPath {
			marker = ALTSGreeting
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		_ = rc.Flush()
		for {
			msg, err := ReadGRPCMessage(r.Body)
			if err != nil {
				break // the client's end of stream (or a broken one: end the call)
			}
			if _, err := w.Write(GRPCMessage(marker + ": " + string(msg))); err != nil {
				return
			}
			_ = rc.Flush()
		}
		w.Header().Set("Grpc-Status", "0")
	})
}

// GRPCMessage frames payload as one gRPC length-prefixed message (uncompressed).
func GRPCMessage(payload string) []byte {
	b := make([]byte, 5, 5+len(payload))
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

// ReadGRPCMessage reads one gRPC length-prefixed message (at most 64 KiB).
func ReadGRPCMessage(r io.Reader) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if hdr[0] != 0 || n > 64<<10 {
		return nil, fmt.Errorf("gRPC message: flag %d, length %d", hdr[0], n)
	}
	msg := make([]byte, n)
	_, err := io.ReadFull(r, msg)
	return msg, err
}

// ServeALTS serves the ALTS stand-in on ln: HTTP/1.1 and HTTP/2 with prior knowledge.
// Every request is recorded (ALTSRequests) and, when ALTSLog is set, logged.
func (s *Services) ServeALTS(ln net.Listener) {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: ALTSHandler(s.recordALTS), Protocols: &protocols,
		ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute}
	s.start(func() error { return srv.Serve(ln) }, func() error {
		if err := srv.Close(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
}

func (s *Services) recordALTS(r ALTSRequest) {
	s.mu.Lock()
	s.altsSeen = append(s.altsSeen, r)
	s.mu.Unlock()
	if s.ALTSLog != nil {
		s.ALTSLog.Info("ALTS stand-in request", "proto", r.Proto, "method", r.Method, "path", r.Path,
			"content_type", r.ContentType, "remote", r.Remote)
	}
}

// ALTSRequests returns the requests the ALTS stand-in served so far.
func (s *Services) ALTSRequests() []ALTSRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]ALTSRequest(nil), s.altsSeen...)
}

// Dialer dials a TCP address (from a netns, for instance).
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// ALTSProbe is one request to port 8080: a gRPC-shaped call over HTTP/2 with prior
// knowledge, or a plain HTTP request over HTTP/2 or HTTP/1.1.
type ALTSProbe struct {
	Name        string
	HTTP1       bool
	Method      string
	Path        string
	ContentType string // application/grpc makes it a gRPC-shaped call
}

// ALTSHandshakerCall is what grpc-go's ALTS handshaker client sends.
var ALTSHandshakerCall = ALTSProbe{Name: "gRPC call to the handshaker over h2c", Method: http.MethodPost,
	Path: ALTSHandshakerPath, ContentType: "application/grpc"}

// ALTSOtherProbes are requests on port 8080 that a relay carrying only the handshaker
// service must not pass.
var ALTSOtherProbes = []ALTSProbe{
	{Name: "HTTP/1.1 GET /", HTTP1: true, Method: http.MethodGet, Path: "/"},
	{Name: "HTTP/1.1 gRPC-shaped POST to the handshaker path", HTTP1: true, Method: http.MethodPost, Path: ALTSHandshakerPath, ContentType: "application/grpc"},
	{Name: "h2c gRPC call to another service", Method: http.MethodPost, Path: "/grpc.health.v1.Health/Check", ContentType: "application/grpc"},
	{Name: "h2c GET of a metadata path", Method: http.MethodGet, Path: "/computeMetadata/v1/instance/attributes/kube-env"},
	{Name: "h2c POST to the handshaker path, not gRPC", Method: http.MethodPost, Path: ALTSHandshakerPath, ContentType: "application/json"},
	{Name: "h2c gRPC call with a dot segment out of the service", Method: http.MethodPost, Path: "/grpc.gcp.HandshakerService/../other.Service/Method", ContentType: "application/grpc"},
}

// Do sends the probe to addr through dial and returns the answer: for a gRPC-shaped
// call, its answer messages joined by newlines (grpc-status must be 0); otherwise the
// body. Any failure to get an answer is an error.
func (p ALTSProbe) Do(ctx context.Context, dial Dialer, addr string) (string, error) {
	tr := &http.Transport{DialContext: dial, DisableKeepAlives: true}
	if !p.HTTP1 {
		var protocols http.Protocols
		protocols.SetUnencryptedHTTP2(true)
		tr.Protocols = &protocols
	}
	defer tr.CloseIdleConnections()
	grpc := strings.HasPrefix(p.ContentType, "application/grpc")
	var body io.Reader = http.NoBody
	if grpc {
		body = bytes.NewReader(GRPCMessage("client hello"))
	} else if p.Method == http.MethodPost {
		body = strings.NewReader("{}")
	}
	req, err := http.NewRequestWithContext(ctx, p.Method, "http://"+addr, body)
	if err != nil {
		return "", err
	}
	req.URL.Opaque = p.Path // as written: no cleaning of dot segments
	if p.ContentType != "" {
		req.Header.Set("Content-Type", p.ContentType)
	}
	if grpc {
		req.Header.Set("TE", "trailers")
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if !grpc || resp.Header.Get("Content-Type") != "application/grpc" {
		b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return strings.TrimSpace(string(b)), err
	}
	var msgs []string
	for {
		msg, err := ReadGRPCMessage(resp.Body)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return strings.Join(msgs, "\n"), err
		}
		msgs = append(msgs, string(msg))
	}
	if st := resp.Trailer.Get("Grpc-Status"); st != "0" {
		return strings.Join(msgs, "\n"), fmt.Errorf("grpc-status %q", st)
	}
	return strings.Join(msgs, "\n"), nil
}

// ALTSHandshakerAnswer is what the stand-in answers ALTSHandshakerCall.
const ALTSHandshakerAnswer = ALTSGreeting + ": client hello"
