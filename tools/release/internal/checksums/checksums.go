// Package checksums writes and checks the release's SHA256SUMS: one line per file of
// dist/ ("<hex>  <path>", what sha256sum -c reads), every file but the list itself and
// its signature. Check fails on a changed, missing or unlisted file.
package checksums

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const (
	File      = "SHA256SUMS"
	Signature = "SHA256SUMS.sigstore.json" // cosign bundle
)

// FileDigest is the hex SHA-256 of a file.
func FileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// list returns every regular file under dir, relative, slash-separated, sorted,
// without the list and its signature; anything else (a symlink, a device) is an error.
func list(dir string) ([]string, error) {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		switch {
		case d.IsDir():
			return nil
		case !d.Type().IsRegular():
			return fmt.Errorf("%s: not a regular file", p)
		case rel == File || rel == Signature:
			return nil
		}
		files = append(files, rel)
		return nil
	})
	sort.Strings(files)
	return files, err
}

// Write writes dir/SHA256SUMS.
func Write(dir string) error {
	files, err := list(dir)
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, f := range files {
		d, err := FileDigest(filepath.Join(dir, f))
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s  %s\n", d, f)
	}
	return os.WriteFile(filepath.Join(dir, File), []byte(b.String()), 0o644)
}

// Read parses dir/SHA256SUMS into path -> hex digest.
func Read(dir string) (map[string]string, error) {
	f, err := os.Open(filepath.Join(dir, File))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sums := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		d, p, ok := strings.Cut(sc.Text(), "  ")
		if !ok || len(d) != 64 || p == "" || strings.Contains(p, "..") || strings.HasPrefix(p, "/") {
			return nil, fmt.Errorf("%s line %d: malformed %q", File, n, sc.Text())
		}
		if _, err := hex.DecodeString(d); err != nil {
			return nil, fmt.Errorf("%s line %d: %w", File, n, err)
		}
		if _, dup := sums[p]; dup {
			return nil, fmt.Errorf("%s line %d: %s listed twice", File, n, p)
		}
		sums[p] = d
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(sums) == 0 {
		return nil, fmt.Errorf("%s lists no file", File)
	}
	return sums, nil
}

// Check compares every file of dir with SHA256SUMS: all listed files must exist with
// their digest, and no other file may be there.
func Check(dir string) (map[string]string, error) {
	sums, err := Read(dir)
	if err != nil {
		return nil, err
	}
	files, err := list(dir)
	if err != nil {
		return nil, err
	}
	present := map[string]bool{}
	for _, f := range files {
		present[f] = true
		want, ok := sums[f]
		if !ok {
			return nil, fmt.Errorf("%s is not listed in %s", f, File)
		}
		got, err := FileDigest(filepath.Join(dir, f))
		if err != nil {
			return nil, err
		}
		if got != want {
			return nil, fmt.Errorf("%s: sha256 %s, %s says %s", f, got, File, want)
		}
	}
	for p := range sums {
		if !present[p] {
			return nil, fmt.Errorf("%s lists %s, which is missing", File, p)
		}
	}
	return sums, nil
}
