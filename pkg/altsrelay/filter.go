package altsrelay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// HandshakerServicePrefix is the only path prefix the relay passes: the methods of
// the ALTS handshaker service (grpc-go's credentials/alts calls
// /grpc.gcp.HandshakerService/DoHandshake).
const HandshakerServicePrefix = "/grpc.gcp.HandshakerService/"

// Refusal reasons, the label values of metaconceal_proxy_alts_refused_total besides
// the caps' (node_limit, pod_limit, shutting_down).
const (
	reasonTLS              = "tls"               // the first bytes are a TLS record
	reasonHTTP1            = "http1"             // the first bytes look like an HTTP/1.x request
	reasonNotH2            = "not_h2"            // anything else that is not the HTTP/2 client preface
	reasonNoRequest        = "no_request"        // the client ended before its first request
	reasonFrame            = "h2_frame"          // a frame the filter does not pass (type, order, size, stream, header encoding)
	reasonPath             = "path"              // a request outside HandshakerServicePrefix
	reasonNotGRPC          = "not_grpc"          // a request under the prefix that is not a gRPC call (method, content-type)
	reasonHandshakeTimeout = "handshake_timeout" // preface and first request not in time
)

var filterReasons = []string{reasonTLS, reasonHTTP1, reasonNotH2, reasonNoRequest, reasonFrame, reasonPath, reasonNotGRPC, reasonHandshakeTimeout}

// refusal is why the filter ends a connection. detail is for the audit line.
type refusal struct {
	reason, detail string
	// method, path and contentType of a refused request (HEADERS), clipped.
	method, path, contentType string
}

func (r *refusal) Error() string {
	return fmt.Sprintf("refused (%s): %s", r.reason, r.detail)
}

func refuse(reason, format string, args ...any) *refusal {
	return &refusal{reason: reason, detail: fmt.Sprintf(format, args...)}
}

const (
	// maxControlFrame bounds the frames the filter reads whole (all but DATA, which
	// is streamed through): HTTP/2's initial SETTINGS_MAX_FRAME_SIZE; a handshaker
	// client's HEADERS, SETTINGS, PING and WINDOW_UPDATE frames are far smaller.
	maxControlFrame = 16 << 10
	// maxHeaderList bounds one request's decoded header list (a gRPC call to the
	// handshaker sends some 300 bytes).
	maxHeaderList = 16 << 10
	// maxHeaderTable is the largest HPACK dynamic table the filter follows: more than
	// any server advertises by default (4096), so the filter never refuses what the
	// metadata server would accept, bounded so a client cannot make it hold much.
	maxHeaderTable = 64 << 10
	// maxAuditField clips values quoted in audit lines.
	maxAuditField = 200
)

// filter reads what a client sends and passes only what an ALTS handshaker client
// sends: the HTTP/2 client preface (prior knowledge, h2c), then frames whose every
// HEADERS is a gRPC call under HandshakerServicePrefix. It never changes a byte: what
// it returns is exactly what it read.
//
// Frames other than DATA are read whole and parsed by x/net/http2's Framer, which
// decodes each header block (HEADERS and its CONTINUATIONs) with one HPACK decoder for
// the whole connection, as the server does, so the filter sees the same header fields
// as the server. DATA frames are checked by their header (an open stream of this
// connection) and their payload streamed through unparsed.
type filter struct {
	br  *bufio.Reader
	rec bytes.Buffer // the bytes of the frame being read
	fr  *http2.Framer

	sawSettings bool
	lastStream  uint32 // highest stream a passed request opened
	requests    int    // requests passed
}

// recorder feeds the Framer from the buffered client and keeps what it read.
type recorder struct{ f *filter }

func (r recorder) Read(p []byte) (int, error) {
	n, err := r.f.br.Read(p)
	r.f.rec.Write(p[:n])
	return n, err
}

func newFilter(client io.Reader) *filter {
	f := &filter{br: bufio.NewReaderSize(client, 16<<10)}
	f.fr = http2.NewFramer(nil, recorder{f})
	f.fr.SetMaxReadFrameSize(maxControlFrame)
	f.fr.MaxHeaderListSize = maxHeaderList
	f.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	f.fr.ReadMetaHeaders.SetAllowedMaxDynamicTableSize(maxHeaderTable)
	return f
}

// preface reads the client connection preface, failing at the first byte that
// differs from it (an HTTP/1.1 client waiting for its answer is refused at once).
func (f *filter) preface() error {
	want := http2.ClientPreface
	for i := 0; i < len(want); i++ {
		b, err := f.br.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return refuse(reasonNoRequest, "connection ended after %d bytes of the HTTP/2 preface", i)
			}
			return err
		}
		if b != want[i] {
			return refuseFirstBytes(append([]byte(want[:i]), b), f.br)
		}
	}
	return nil
}

// refuseFirstBytes says what the first bytes that are not the preface look like,
// from them and what else is already buffered (it waits for nothing more).
func refuseFirstBytes(seen []byte, br *bufio.Reader) *refusal {
	more, _ := br.Peek(min(br.Buffered(), 24))
	seen = append(seen, more...)
	if seen[0] == 0x16 {
		return refuse(reasonTLS, "a TLS handshake")
	}
	// An HTTP/1.x request line starts with a method, an uppercase token, and a space.
	if sp := bytes.IndexByte(seen, ' '); sp > 0 && bytes.IndexFunc(seen[:sp], func(r rune) bool { return r < 'A' || r > 'Z' }) < 0 {
		return refuse(reasonHTTP1, "HTTP/1.x, not HTTP/2 with prior knowledge")
	}
	return refuse(reasonNotH2, "not the HTTP/2 client preface (%q)", clip(string(seen)))
}

// next reads the client's next frame and checks it. raw is its bytes (valid until the
// next call); for a DATA frame raw is the 9-byte frame header only and data is how
// many payload bytes follow on f.br, to be copied through by the caller. At the end
// of the client's stream between frames it returns io.EOF, or a refusal when no
// request came; other read errors are returned as they are.
func (f *filter) next() (raw []byte, data int64, err error) {
	f.rec.Reset()
	fh, err := f.fr.ReadFrameHeader()
	switch {
	case errors.Is(err, http2.ErrFrameTooLarge) && fh.Type == http2.FrameData:
		// DATA is streamed, not read whole: any size the server allows passes.
	case errors.Is(err, io.EOF) && f.rec.Len() == 0:
		if f.requests == 0 {
			return nil, 0, refuse(reasonNoRequest, "connection ended before its first request")
		}
		return nil, 0, io.EOF
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return nil, 0, refuse(reasonFrame, "connection ended inside a frame")
	case err != nil:
		return nil, 0, classify(err)
	}
	if !f.sawSettings && fh.Type != http2.FrameSettings {
		return nil, 0, refuse(reasonFrame, "%s before the preface's SETTINGS", fh.Type)
	}
	if fh.Type == http2.FrameData {
		if fh.StreamID%2 == 0 || fh.StreamID > f.lastStream {
			return nil, 0, refuse(reasonFrame, "DATA on stream %d, which no passed request opened", fh.StreamID)
		}
		return f.rec.Bytes(), int64(fh.Length), nil
	}
	fr, err := f.fr.ReadFrameForHeader(fh)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, 0, refuse(reasonFrame, "connection ended inside a frame")
		}
		return nil, 0, classify(err)
	}
	switch fr := fr.(type) {
	case *http2.SettingsFrame:
		if !f.sawSettings && fr.IsAck() {
			return nil, 0, refuse(reasonFrame, "SETTINGS ACK as the preface's SETTINGS")
		}
		f.sawSettings = true
	case *http2.MetaHeadersFrame:
		if fr.StreamID%2 == 0 || fr.StreamID <= f.lastStream {
			// Trailers, or a stream that is not new: a handshaker client sends neither.
			return nil, 0, refuse(reasonFrame, "HEADERS on stream %d, not a new client stream (last %d)", fr.StreamID, f.lastStream)
		}
		if r := checkRequest(fr); r != nil {
			return nil, 0, r
		}
		f.lastStream = fr.StreamID
		f.requests++
	case *http2.PingFrame, *http2.WindowUpdateFrame, *http2.RSTStreamFrame, *http2.PriorityFrame, *http2.GoAwayFrame:
	default:
		// PUSH_PROMISE (never a client's), extension frame types, and anything the
		// Framer returns that a handshaker client does not send.
		return nil, 0, refuse(reasonFrame, "%s frame", fh.Type)
	}
	return f.rec.Bytes(), 0, nil
}

// nextFrameBuffered reports whether the client's next frame is already read whole
// (so that checking it waits for nothing).
func (f *filter) nextFrameBuffered() bool {
	n := f.br.Buffered()
	if n < 9 {
		return false
	}
	hdr, err := f.br.Peek(9)
	if err != nil {
		return false
	}
	length := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
	return n >= 9+length
}

// classify turns the Framer's errors into refusals; errors of the connection itself
// (a deadline, a close, a reset) stay what they are.
func classify(err error) error {
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if errors.Is(err, http2.ErrFrameTooLarge) {
		return refuse(reasonFrame, "frame larger than %d bytes", maxControlFrame)
	}
	return refuse(reasonFrame, "%v", err)
}

// checkRequest passes a request only if it is a gRPC call (POST, content-type
// application/grpc or application/grpc+codec) to a method of the handshaker service.
func checkRequest(mh *http2.MetaHeadersFrame) *refusal {
	method, path := mh.PseudoValue("method"), mh.PseudoValue("path")
	var ctypes []string
	for _, hf := range mh.RegularFields() {
		if hf.Name == "content-type" {
			ctypes = append(ctypes, hf.Value)
		}
	}
	r := func(reason, format string, args ...any) *refusal {
		rf := refuse(reason, format, args...)
		rf.method, rf.path, rf.contentType = clip(method), clip(path), clip(strings.Join(ctypes, ","))
		return rf
	}
	switch {
	case mh.Truncated:
		return r(reasonFrame, "header list larger than %d bytes", maxHeaderList)
	case !validHandshakerPath(path):
		return r(reasonPath, "a request outside %s", HandshakerServicePrefix)
	case method != "POST" || mh.PseudoValue("protocol") != "":
		return r(reasonNotGRPC, "method %q, not a gRPC call's POST", clip(method))
	case len(ctypes) != 1 || !isGRPCContentType(ctypes[0]):
		return r(reasonNotGRPC, "content-type not a gRPC call's")
	}
	return nil
}

// validHandshakerPath: the prefix and one method name, nothing a server could read
// as another path (no further slash, dot segment, percent-encoding or query).
func validHandshakerPath(path string) bool {
	name, ok := strings.CutPrefix(path, HandshakerServicePrefix)
	if !ok || name == "" || len(name) > 128 {
		return false
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// isGRPCContentType is gRPC's rule: "application/grpc", optionally followed by
// "+codec" or ";parameters".
func isGRPCContentType(v string) bool {
	rest, ok := strings.CutPrefix(v, "application/grpc")
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}

func clip(s string) string {
	if len(s) <= maxAuditField {
		return s
	}
	return s[:maxAuditField] + "..."
}
