package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"strings"
	"time"
)

// token is what the cache needs from a token answer.
type token struct {
	expiresIn        int64
	numStart, numEnd int // the expires_in digits in the body
}

// parseToken reads a token answer: JSON ({"access_token": "...", "expires_in": N,
// ...}) or alt=text ("access_token ...\nexpires_in N\n..."). Anything else, a
// missing or empty access_token, a duplicate or non-integer expires_in, or one
// outside (0, maxTokenLifetime], is not a cacheable token.
func parseToken(body []byte) (token, bool) {
	trimmed := strings.TrimLeft(string(body), " \t\r\n")
	var tok token
	var ok bool
	if strings.HasPrefix(trimmed, "{") {
		tok, ok = parseJSONToken(body)
	} else {
		tok, ok = parseTextToken(body)
	}
	if !ok || tok.expiresIn <= 0 || time.Duration(tok.expiresIn)*time.Second > maxTokenLifetime {
		return token{}, false
	}
	return tok, true
}

// parseTextToken reads the alt=text form, one "key value" per line.
func parseTextToken(body []byte) (token, bool) {
	var tok token
	found, hasToken := false, false
	s := string(body)
	for off := 0; off < len(s); {
		line := s[off:]
		next := len(s)
		if i := strings.IndexByte(line, '\n'); i >= 0 {
			line, next = line[:i], off+i+1
		}
		key, value, _ := strings.Cut(line, " ")
		switch {
		case strings.EqualFold(key, "expires_in"):
			if found || key != "expires_in" || !allDigits(value) || len(value) > 9 {
				return token{}, false
			}
			found = true
			tok.expiresIn, _ = strconv.ParseInt(value, 10, 64)
			tok.numStart = off + len(key) + 1
			tok.numEnd = tok.numStart + len(value)
		case strings.EqualFold(key, "access_token"):
			if hasToken || key != "access_token" || value == "" {
				return token{}, false
			}
			hasToken = true
		}
		off = next
	}
	return tok, found && hasToken
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// parseJSONToken reads the JSON form: one object whose top-level access_token is a
// non-empty string and whose top-level expires_in is a plain integer, each once.
func parseJSONToken(body []byte) (token, bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return token{}, false
	}
	var tok token
	found, hasToken := false, false
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return token{}, false
		}
		key, _ := kt.(string)
		vt, err := dec.Token()
		if err != nil {
			return token{}, false
		}
		if d, nested := vt.(json.Delim); nested {
			if skipNested(dec, d) != nil {
				return token{}, false
			}
		}
		switch {
		case strings.EqualFold(key, "expires_in"):
			n, isNum := vt.(json.Number)
			if found || key != "expires_in" || !isNum || !allDigits(string(n)) || len(n) > 9 {
				return token{}, false
			}
			end := int(dec.InputOffset())
			start := end - len(n)
			if start < 0 || string(body[start:end]) != string(n) {
				return token{}, false
			}
			found = true
			tok.expiresIn, _ = strconv.ParseInt(string(n), 10, 64)
			tok.numStart, tok.numEnd = start, end
		case strings.EqualFold(key, "access_token"):
			s, isStr := vt.(string)
			if hasToken || key != "access_token" || !isStr || s == "" {
				return token{}, false
			}
			hasToken = true
		}
	}
	if t, err := dec.Token(); err != nil || t != json.Delim('}') {
		return token{}, false
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return token{}, false // trailing data
	}
	return tok, found && hasToken
}

// skipNested consumes a nested object or array whose opening delimiter was read.
func skipNested(dec *json.Decoder, open json.Delim) error {
	if open != '{' && open != '[' {
		return errors.New("unexpected closing delimiter")
	}
	for depth := 1; depth > 0; {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		if d, ok := t.(json.Delim); ok {
			if d == '{' || d == '[' {
				depth++
			} else {
				depth--
			}
		}
	}
	return nil
}
