package verify

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/metaconceal/metaconceal/tools/release/internal/checksums"
	"github.com/metaconceal/metaconceal/tools/release/internal/cosign"
	"github.com/metaconceal/metaconceal/tools/release/internal/dist"
	"github.com/metaconceal/metaconceal/tools/release/internal/release"
)

// env is the release that make test-release (tools/release/test-release.sh) cut.
type env struct {
	dist, key, pub, repo string
	cosign               cosign.Cosign
}

func releaseEnv(t *testing.T) env {
	t.Helper()
	e := env{
		dist: os.Getenv("METACONCEAL_RELEASE_DIST"), key: os.Getenv("METACONCEAL_RELEASE_SIGNING_KEY"),
		pub: os.Getenv("METACONCEAL_RELEASE_PUBLIC_KEY"), repo: os.Getenv("METACONCEAL_REPO"),
		cosign: cosign.Cosign{Path: os.Getenv("METACONCEAL_COSIGN")},
	}
	if e.dist == "" || e.key == "" || e.pub == "" || e.cosign.Path == "" || e.repo == "" {
		t.Fatal("these tests check a real release: run them with make test-release (tools/release/test-release.sh)")
	}
	return e
}

// copyRelease copies a release directory; the large layout blobs are hard-linked
// (flipByte replaces the file it changes, so the original stays intact).
func copyRelease(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "dist")
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		if filepath.Dir(filepath.Dir(rel)) == filepath.Join(dist.OCI, "blobs") {
			return os.Link(p, filepath.Join(dst, rel))
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// flipByte replaces file by a copy with one bit of its middle byte flipped.
func flipByte(t *testing.T, file string) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0x01
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func manifestOf(t *testing.T, dir string, d v1.Hash) *v1.Manifest {
	t.Helper()
	f, err := os.Open(blob(dir, d))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := v1.ParseManifest(f)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func blob(dir string, d v1.Hash) string {
	return filepath.Join(dir, dist.OCI, "blobs", d.Algorithm, d.Hex)
}

// platformManifest is the digest of the image for arch in the release's index.
func platformManifest(t *testing.T, dir, arch string) v1.Hash {
	t.Helper()
	idx, err := release.IndexDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(blob(dir, idx))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	im, err := v1.ParseIndexManifest(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range im.Manifests {
		if d.Platform != nil && d.Platform.Architecture == arch {
			return d.Digest
		}
	}
	t.Fatalf("no linux/%s in the index", arch)
	return v1.Hash{}
}

func TestReleaseVerifies(t *testing.T) {
	e := releaseEnv(t)
	if err := Verify(context.Background(), Options{Dist: copyRelease(t, e.dist), PublicKey: e.pub, Cosign: e.cosign, Log: io.Discard}); err != nil {
		t.Fatalf("the untouched release does not verify: %v", err)
	}
}

func TestReleaseHoldsTheChartWhenTheTreeHasOne(t *testing.T) {
	e := releaseEnv(t)
	charts, err := release.Charts(e.dist)
	if err != nil {
		t.Fatal(err)
	}
	_, statErr := os.Stat(filepath.Join(e.repo, "charts", "metaconceal", "Chart.yaml"))
	if hasChart := statErr == nil; hasChart != (len(charts) == 1) {
		t.Fatalf("tree has charts/metaconceal: %v; release holds %d charts", hasChart, len(charts))
	}
}

func TestTamperedReleaseFails(t *testing.T) {
	e := releaseEnv(t)
	type tc struct {
		name   string
		target func(t *testing.T, dir string) string // the file to flip a byte in
		// resign rewrites SHA256SUMS and signs it again with the release key, as an
		// attacker who could do that would: the tamper must be caught by another check.
		resign bool
		want   string // in the error
	}
	indexBlob := func(t *testing.T, dir string) string {
		p, err := release.IndexBlob(dir)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	layer := func(arch string, i int) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string {
			m := manifestOf(t, dir, platformManifest(t, dir, arch))
			return blob(dir, m.Layers[i].Digest)
		}
	}
	config := func(arch string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string {
			return blob(dir, manifestOf(t, dir, platformManifest(t, dir, arch)).Config.Digest)
		}
	}
	manifest := func(arch string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string { return blob(dir, platformManifest(t, dir, arch)) }
	}
	file := func(rel string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string { return filepath.Join(dir, rel) }
	}
	cases := []tc{
		{"layout index.json", file(filepath.Join(dist.OCI, "index.json")), false, "SHA256SUMS"},
		{"image index", indexBlob, false, "SHA256SUMS"},
		{"image index, sums re-signed", indexBlob, true, "signature over the image index"},
		{"arm64 manifest", manifest("arm64"), false, "SHA256SUMS"},
		{"amd64 config", config("amd64"), false, "SHA256SUMS"},
		{"arm64 binaries layer", layer("arm64", 1), false, "SHA256SUMS"},
		{"amd64 Debian layer", layer("amd64", 0), false, "SHA256SUMS"},
		{"arm64 binaries layer, sums re-signed", layer("arm64", 1), true, "image index"},
		{"SBOM amd64", file(dist.SBOM("amd64")), false, "SHA256SUMS"},
		{"SBOM arm64", file(dist.SBOM("arm64")), false, "SHA256SUMS"},
		{"SBOM arm64, sums re-signed", file(dist.SBOM("arm64")), true, "sbom/linux-arm64"},
		{"provenance", file(dist.Provenance), false, "SHA256SUMS"},
		{"SHA256SUMS", file(checksums.File), false, "signature over SHA256SUMS"},
		{"SHA256SUMS signature", file(checksums.Signature), false, "signature over SHA256SUMS"},
		{"image index signature", file(dist.IndexBundle), false, "SHA256SUMS"},
	}
	charts, err := release.Charts(e.dist)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range charts {
		rel, _ := filepath.Rel(e.dist, ch)
		cases = append(cases,
			tc{"chart", file(rel), false, "SHA256SUMS"},
			tc{"chart, sums re-signed", file(rel), true, "signature over the chart"},
			tc{"chart signature", file(rel + cosign.BundleExt), false, "SHA256SUMS"},
		)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := copyRelease(t, e.dist)
			flipByte(t, c.target(t, dir))
			if c.resign {
				if err := checksums.Write(dir); err != nil {
					t.Fatal(err)
				}
				if err := e.cosign.SignBlob(context.Background(), e.key, filepath.Join(dir, checksums.File), filepath.Join(dir, checksums.Signature)); err != nil {
					t.Fatal(err)
				}
			}
			err := Verify(context.Background(), Options{Dist: dir, PublicKey: e.pub, Cosign: e.cosign, Log: io.Discard})
			if err == nil {
				t.Fatal("a tampered release verifies")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not name %q", err, c.want)
			}
		})
	}
}

func TestReleaseFailsWithAnotherKey(t *testing.T) {
	e := releaseEnv(t)
	keys := t.TempDir()
	cmd := exec.Command(e.cosign.Path, "generate-key-pair")
	cmd.Dir = keys
	cmd.Env = append(os.Environ(), "COSIGN_PASSWORD=another")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("generate-key-pair: %v: %s", err, out)
	}
	err := Verify(context.Background(), Options{Dist: copyRelease(t, e.dist), PublicKey: filepath.Join(keys, "cosign.pub"), Cosign: e.cosign, Log: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "signature over SHA256SUMS") {
		t.Fatalf("verify with another key: %v, want a signature failure", err)
	}
}

func TestExtraOrMissingFileFails(t *testing.T) {
	e := releaseEnv(t)
	for _, c := range []struct {
		name   string
		change func(dir string) error
		want   string
	}{
		{"extra file", func(dir string) error {
			return os.WriteFile(filepath.Join(dir, dist.SBOMDir, "extra.json"), []byte("{}"), 0o644)
		}, "not listed"},
		{"missing SBOM", func(dir string) error { return os.Remove(filepath.Join(dir, dist.SBOM("arm64"))) }, "missing"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := copyRelease(t, e.dist)
			if err := c.change(dir); err != nil {
				t.Fatal(err)
			}
			err := Verify(context.Background(), Options{Dist: dir, PublicKey: e.pub, Cosign: e.cosign, Log: io.Discard})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("verify: %v, want an error naming %q", err, c.want)
			}
		})
	}
}

// The amd64 binaries of the image run here: each reports the release's version, the
// commit and the Go version it was built with (internal/buildinfo).
func TestAmd64BinariesReportTheRelease(t *testing.T) {
	e := releaseEnv(t)
	lp, err := layout.FromPath(filepath.Join(e.dist, dist.OCI))
	if err != nil {
		t.Fatal(err)
	}
	ii, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	top, err := ii.ImageIndex(indexDigest(t, e.dist))
	if err != nil {
		t.Fatal(err)
	}
	im, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	version, commit := im.Annotations["org.opencontainers.image.version"], im.Annotations["org.opencontainers.image.revision"]
	img, err := top.Image(platformManifest(t, e.dist, "amd64"))
	if err != nil {
		t.Fatal(err)
	}
	files, err := readBinaries(img)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, b := range dist.Binaries {
		p := filepath.Join(dir, b)
		if err := os.WriteFile(p, files[b], 0o755); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(p, "--version").CombinedOutput()
		if err != nil {
			t.Fatalf("%s --version: %v: %s", b, err, out)
		}
		want := fmt.Sprintf("%s %s (commit %s, %s)", b, version, commit, runtime.Version())
		if got := strings.TrimSpace(string(out)); got != want {
			t.Errorf("%s --version = %q, want %q", b, got, want)
		}
	}
}

func indexDigest(t *testing.T, dir string) v1.Hash {
	t.Helper()
	d, err := release.IndexDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
