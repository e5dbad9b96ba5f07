package sbom

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// The test binary stands in for a shipped binary: it has Go build information too.
func TestBuild(t *testing.T) {
	manifest := "sha256:" + strings.Repeat("ab", 32)
	im := Image{
		Name: "metaconceal", Version: "1.2.3", Arch: "arm64", Manifest: manifest, Distro: "debian-12",
		Binaries:   []string{os.Args[0]},
		Packages:   []DebPackage{{Name: "libc6", Version: "2.36-9+deb12u14", Architecture: "arm64", Source: "glibc", SHA256: strings.Repeat("cd", 32)}},
		SourceDate: time.Unix(1700000000, 0),
	}
	b, err := Build(im)
	if err != nil {
		t.Fatal(err)
	}
	refs := map[string]Component{}
	for _, c := range b.Components {
		refs[c.BOMRef] = c
	}
	for _, want := range []string{
		"pkg:golang/stdlib@" + runtime.Version(),
		"pkg:deb/debian/libc6@2.36-9+deb12u14?arch=arm64&distro=debian-12",
		"file:/metaconceal/" + filepath.Base(os.Args[0]),
	} {
		if _, ok := refs[want]; !ok {
			t.Errorf("no component %s", want)
		}
	}
	if got := b.Metadata.Component; got.Hashes[0].Content != strings.Repeat("ab", 32) || !strings.Contains(got.PURL, "arch=arm64") {
		t.Errorf("metadata component %+v does not name the manifest", got)
	}
	again, _ := Build(im)
	if again.SerialNumber != b.SerialNumber || !strings.HasPrefix(b.SerialNumber, "urn:uuid:") {
		t.Errorf("serial numbers %s, %s: want one stable urn:uuid", b.SerialNumber, again.SerialNumber)
	}
	im.Manifest = "sha512:00"
	if _, err := Build(im); err == nil {
		t.Error("a non-sha256 manifest digest is accepted")
	}
	file := filepath.Join(t.TempDir(), "sbom.json")
	if err := Write(file, b); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(file); err != nil {
		t.Fatalf("Read(Write(b)): %v", err)
	}
}
