// Package verify checks a release directory offline with the release's public key:
// the signature over SHA256SUMS and every file's digest, the signatures over the image
// index and the chart, the OCI layout from the index down to every manifest, config
// and layer (digests, sizes, diff IDs), that each platform image holds the binaries of
// its architecture (ELF machine, Go build settings, the release version), and that the
// SBOMs and the provenance name the digests the release holds.
package verify

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/metaconceal/metaconceal/tools/release/internal/checksums"
	"github.com/metaconceal/metaconceal/tools/release/internal/cosign"
	"github.com/metaconceal/metaconceal/tools/release/internal/dist"
	"github.com/metaconceal/metaconceal/tools/release/internal/image"
	"github.com/metaconceal/metaconceal/tools/release/internal/provenance"
	"github.com/metaconceal/metaconceal/tools/release/internal/release"
	"github.com/metaconceal/metaconceal/tools/release/internal/sbom"
)

// Options name the release and the key.
type Options struct {
	Dist      string
	PublicKey string
	Cosign    cosign.Cosign
	Log       io.Writer
}

// Verify returns the first mismatch it finds, or nil when the release verifies.
func Verify(ctx context.Context, o Options) error {
	logf := func(format string, a ...any) { fmt.Fprintf(o.Log, format+"\n", a...) }
	// 1. The list of digests, signed.
	if err := o.Cosign.VerifyBlob(ctx, o.PublicKey, filepath.Join(o.Dist, checksums.File), filepath.Join(o.Dist, checksums.Signature)); err != nil {
		return fmt.Errorf("signature over %s: %w", checksums.File, err)
	}
	sums, err := checksums.Check(o.Dist)
	if err != nil {
		return err
	}
	logf("ok  %s signed, %d files match it", checksums.File, len(sums))
	// 2. The image index, signed.
	idxDigest, err := release.IndexDigest(o.Dist)
	if err != nil {
		return err
	}
	idxBlob, err := release.IndexBlob(o.Dist)
	if err != nil {
		return err
	}
	if err := o.Cosign.VerifyBlob(ctx, o.PublicKey, idxBlob, filepath.Join(o.Dist, dist.IndexBundle)); err != nil {
		return fmt.Errorf("signature over the image index %s: %w", idxDigest, err)
	}
	logf("ok  image index %s signed", idxDigest)
	// 3. The chart, signed.
	charts, err := release.Charts(o.Dist)
	if err != nil {
		return err
	}
	for _, ch := range charts {
		if err := o.Cosign.VerifyBlob(ctx, o.PublicKey, ch, ch+cosign.BundleExt); err != nil {
			return fmt.Errorf("signature over the chart %s: %w", filepath.Base(ch), err)
		}
		logf("ok  chart %s signed", filepath.Base(ch))
	}
	// 4. Everything below the index.
	manifests, err := checkImages(o.Dist, idxDigest, logf)
	if err != nil {
		return err
	}
	// 5. SBOMs and provenance name what is here.
	for _, arch := range dist.Platforms {
		if err := checkSBOM(filepath.Join(o.Dist, dist.SBOM(arch)), arch, manifests[arch]); err != nil {
			return err
		}
	}
	logf("ok  SBOMs name their platform images")
	if err := checkProvenance(o.Dist, idxDigest, manifests, sums, charts); err != nil {
		return err
	}
	logf("ok  provenance names the index, both images, the SBOMs%s", map[bool]string{true: " and the chart", false: ""}[len(charts) > 0])
	return nil
}

type platformImage struct {
	manifest v1.Hash
	bins     map[string]string // binary name -> sha256 hex
}

func checkImages(dir string, idxDigest v1.Hash, logf func(string, ...any)) (map[string]platformImage, error) {
	lp, err := layout.FromPath(filepath.Join(dir, dist.OCI))
	if err != nil {
		return nil, err
	}
	ii, err := lp.ImageIndex()
	if err != nil {
		return nil, err
	}
	top, err := ii.ImageIndex(idxDigest)
	if err != nil {
		return nil, fmt.Errorf("image index %s: %w", idxDigest, err)
	}
	if err := validate.Index(top); err != nil {
		return nil, fmt.Errorf("image index %s: %w", idxDigest, err)
	}
	im, err := top.IndexManifest()
	if err != nil {
		return nil, err
	}
	version, commit := im.Annotations["org.opencontainers.image.version"], im.Annotations["org.opencontainers.image.revision"]
	if version == "" || len(commit) != 40 {
		return nil, fmt.Errorf("image index %s names no version or commit (%q, %q)", idxDigest, version, commit)
	}
	out := map[string]platformImage{}
	for _, d := range im.Manifests {
		if d.Platform == nil || d.Platform.OS != "linux" {
			return nil, fmt.Errorf("index entry %s: platform %v, want linux/<arch>", d.Digest, d.Platform)
		}
		arch := d.Platform.Architecture
		if _, dup := out[arch]; dup {
			return nil, fmt.Errorf("index names linux/%s twice", arch)
		}
		img, err := top.Image(d.Digest)
		if err != nil {
			return nil, err
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			return nil, err
		}
		if cfg.OS != "linux" || cfg.Architecture != arch {
			return nil, fmt.Errorf("image %s: config says %s/%s, index says linux/%s", d.Digest, cfg.OS, cfg.Architecture, arch)
		}
		bins, err := checkBinaries(img, arch, version, commit)
		if err != nil {
			return nil, fmt.Errorf("image linux/%s %s: %w", arch, d.Digest, err)
		}
		out[arch] = platformImage{manifest: d.Digest, bins: bins}
		logf("ok  linux/%s %s: manifest, config and layers match their digests; %d binaries are %s ELF", arch, d.Digest, len(bins), elfMachine[arch])
	}
	var got []string
	for a := range out {
		got = append(got, a)
	}
	sort.Strings(got)
	if strings.Join(got, ",") != strings.Join(dist.Platforms, ",") {
		return nil, fmt.Errorf("index holds linux/%v, want linux/%v", got, dist.Platforms)
	}
	return out, nil
}

// buildinfoPkg is the package whose version and commit the release build sets
// (internal/buildinfo of the product module).
const buildinfoPkg = "github.com/metaconceal/metaconceal/internal/buildinfo"

var elfMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

// checkBinaries reads /metaconceal/* from the image's layers and checks that each is
// an ELF file for arch whose Go build information says GOARCH=arch, CGO_ENABLED=0, and
// that it carries the release's version and commit (set with -X into
// internal/buildinfo: what --version and metaconceal_build_info report).
func checkBinaries(img v1.Image, arch, version, commit string) (map[string]string, error) {
	want, ok := elfMachine[arch]
	if !ok {
		return nil, fmt.Errorf("no ELF machine known for %s", arch)
	}
	files, err := readBinaries(img)
	if err != nil {
		return nil, err
	}
	sums := map[string]string{}
	for _, b := range dist.Binaries {
		data, ok := files[b]
		if !ok {
			return nil, fmt.Errorf("no /%s/%s", image.BinDir, b)
		}
		f, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("/%s/%s: not ELF: %w", image.BinDir, b, err)
		}
		if f.Machine != want || f.Class != elf.ELFCLASS64 {
			return nil, fmt.Errorf("/%s/%s: ELF %s %s, want %s", image.BinDir, b, f.Class, f.Machine, want)
		}
		bi, err := buildinfo.Read(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("/%s/%s: %w", image.BinDir, b, err)
		}
		settings := map[string]string{}
		for _, s := range bi.Settings {
			settings[s.Key] = s.Value
		}
		if settings["GOARCH"] != arch || settings["CGO_ENABLED"] != "0" {
			return nil, fmt.Errorf("/%s/%s: built with GOARCH=%q CGO_ENABLED=%q", image.BinDir, b, settings["GOARCH"], settings["CGO_ENABLED"])
		}
		// -trimpath keeps -ldflags out of the build information, so look for the
		// strings the linker put into internal/buildinfo's variables.
		for _, x := range []string{version, commit} {
			if !bytes.Contains(data, []byte(x)) {
				return nil, fmt.Errorf("/%s/%s: does not carry the release's %q (-X %s.version/commit)", image.BinDir, b, x, buildinfoPkg)
			}
		}
		sums[b] = fmt.Sprintf("%x", sha256Sum(data))
	}
	return sums, nil
}

func checkSBOM(file, arch string, img platformImage) error {
	b, err := sbom.Read(file)
	if err != nil {
		return err
	}
	c := b.Metadata.Component
	if c.PURL != sbom.ImagePURL(dist.ImageName, img.manifest.String(), arch) ||
		len(c.Hashes) != 1 || c.Hashes[0].Content != img.manifest.Hex {
		return fmt.Errorf("%s describes %s, not linux/%s %s", file, c.PURL, arch, img.manifest)
	}
	var golang, deb int
	binHash := map[string]string{}
	for _, comp := range b.Components {
		switch {
		case strings.HasPrefix(comp.PURL, "pkg:golang/"):
			golang++
		case strings.HasPrefix(comp.PURL, "pkg:deb/debian/"):
			deb++
		case comp.Type == "application" && len(comp.Hashes) == 1:
			binHash[path.Base(comp.Name)] = comp.Hashes[0].Content
		}
	}
	if golang == 0 || deb == 0 {
		return fmt.Errorf("%s: %d Go modules and %d Debian packages, want both", file, golang, deb)
	}
	for name, sum := range img.bins {
		if binHash[name] != sum {
			return fmt.Errorf("%s: /%s/%s sha256 %q, the image holds %s", file, image.BinDir, name, binHash[name], sum)
		}
	}
	return nil
}

func checkProvenance(dir string, idx v1.Hash, manifests map[string]platformImage, sums map[string]string, charts []string) error {
	st, err := provenance.Read(filepath.Join(dir, dist.Provenance))
	if err != nil {
		return err
	}
	var errs []error
	if len(st.Predicate.BuildDefinition.ExternalParameters.Source.Commit) != 40 || st.Predicate.BuildDefinition.ExternalParameters.Command == "" {
		errs = append(errs, errors.New("provenance names no source commit or build command"))
	}
	have := map[string]bool{}
	for _, s := range st.Subject {
		have[s.Digest["sha256"]] = true
	}
	want := map[string]string{"image index": idx.Hex}
	for arch, m := range manifests {
		want["image linux/"+arch] = m.manifest.Hex
	}
	for _, arch := range dist.Platforms {
		want[dist.SBOM(arch)] = sums[filepath.ToSlash(dist.SBOM(arch))]
	}
	for _, ch := range charts {
		rel, _ := filepath.Rel(dir, ch)
		want[rel] = sums[filepath.ToSlash(rel)]
	}
	for what, d := range want {
		if d == "" || !have[d] {
			errs = append(errs, fmt.Errorf("provenance has no subject for %s (sha256 %s)", what, d))
		}
	}
	if len(st.Subject) != len(want) {
		errs = append(errs, fmt.Errorf("provenance has %d subjects, the release %d", len(st.Subject), len(want)))
	}
	return errors.Join(errs...)
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

// readBinaries returns the regular files directly under /metaconceal/ in the image's
// layers, by name.
func readBinaries(img v1.Image) (map[string][]byte, error) {
	layers, err := img.Layers()
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return nil, err
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				rc.Close()
				return nil, err
			}
			name := path.Clean(strings.TrimPrefix(h.Name, "/"))
			if path.Dir(name) != image.BinDir || h.Typeflag != tar.TypeReg {
				continue
			}
			data, err := io.ReadAll(tr)
			if err != nil {
				rc.Close()
				return nil, err
			}
			files[path.Base(name)] = data
		}
		rc.Close()
	}
	return files, nil
}
