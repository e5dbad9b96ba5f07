package policy

import "strings"

// canonicalPath percent-decodes rawPath once and resolves dot segments and empty
// segments. It returns the canonical path (rawPath itself when already canonical, so
// the common case does not allocate) or the rule that refuses it.
func canonicalPath(rawPath string) (string, Rule) {
	needsDecode, needsClean := false, false
	for i := 0; i < len(rawPath); i++ {
		c := rawPath[i]
		switch {
		case c < 0x20 || c >= 0x7f || c == '\\' || c == '#' || c == ';':
			return "", RuleBadCharacter
		case c == '%':
			needsDecode = true
		case c == '/':
			if i+1 < len(rawPath) && rawPath[i+1] == '/' {
				needsClean = true
			}
		case c == '.':
			if rawPath[i-1] == '/' { // rawPath[0] is '/', so i >= 1 here
				needsClean = true
			}
		}
	}
	if !needsDecode && !needsClean {
		return rawPath, 0
	}
	path := rawPath
	if needsDecode {
		// Nothing that could not appear raw may appear encoded either.
		decoded, ok := percentDecodeOnce(rawPath, false, `\?#;`)
		if !ok {
			return "", RuleBadEscape
		}
		path = decoded
	}
	return cleanPath(path)
}

func cleanPath(path string) (string, Rule) {
	raw := strings.Split(path[1:], "/")
	last := raw[len(raw)-1]
	trailing := last == "" || last == "." || last == ".."
	out := make([]string, 0, len(raw))
	for _, seg := range raw {
		switch seg {
		case "", ".":
		case "..":
			if len(out) == 0 {
				return "", RuleBadPath
			}
			out = out[:len(out)-1]
		default:
			out = append(out, seg)
		}
	}
	if len(out) == 0 {
		return "/", 0
	}
	s := "/" + strings.Join(out, "/")
	if trailing {
		s += "/"
	}
	return s, 0
}

// splitSegments splits a canonical path into its segments, appending to buf.
func splitSegments(canon string, buf []string) []string {
	s := strings.Trim(canon, "/")
	if s == "" {
		return buf
	}
	for seg := range strings.SplitSeq(s, "/") {
		buf = append(buf, seg)
	}
	return buf
}

// percentDecodeOnce decodes %XX escapes once, and '+' as a space when plusIsSpace (a
// query). It refuses an invalid escape and an escape that decodes to a control or
// non-ASCII byte, to '%' (double encoding, which another decoder along the way could
// read differently) or to a byte in refuse. s itself is returned when there is
// nothing to decode, so the common case does not allocate.
func percentDecodeOnce(s string, plusIsSpace bool, refuse string) (string, bool) {
	if strings.IndexByte(s, '%') < 0 && (!plusIsSpace || strings.IndexByte(s, '+') < 0) {
		return s, true
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '+' && plusIsSpace:
			b.WriteByte(' ')
		case c == '%':
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return "", false
			}
			d := unhex(s[i+1])<<4 | unhex(s[i+2])
			if d < 0x20 || d >= 0x7f || d == '%' || strings.IndexByte(refuse, d) >= 0 {
				return "", false
			}
			b.WriteByte(d)
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), true
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// SplitV1 returns the segments of a canonical path under /computeMetadata/v1/ and true,
// or false when the path is not there.
func SplitV1(canon string) ([]string, bool) {
	segs := splitSegments(canon, nil)
	if len(segs) < 2 || segs[0] != "computeMetadata" || segs[1] != "v1" {
		return nil, false
	}
	return segs[2:], true
}
