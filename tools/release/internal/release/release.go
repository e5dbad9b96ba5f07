// Package release writes a release directory (internal/dist): the multi-platform
// image, an SBOM per platform, the provenance, the chart, then the signatures and the
// checksums.
package release

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/metaconceal/metaconceal/tools/release/internal/checksums"
	"github.com/metaconceal/metaconceal/tools/release/internal/cosign"
	"github.com/metaconceal/metaconceal/tools/release/internal/dist"
	"github.com/metaconceal/metaconceal/tools/release/internal/image"
	"github.com/metaconceal/metaconceal/tools/release/internal/provenance"
	"github.com/metaconceal/metaconceal/tools/release/internal/sbom"
)

// BuildOptions are the inputs of Build.
type BuildOptions struct {
	Version    string
	Commit     string
	TreeState  string // clean or dirty
	Command    string // the build command, for the provenance
	SourceDate time.Time
	// Work holds, per architecture, <arch>/rootfs (product-rootfs), <arch>/packages.json
	// and <arch>/bin/ (the cross-compiled binaries).
	Work   string
	Chart  string // packaged chart (.tgz), or "" when the release has no chart
	Distro string // purl distro of the Debian packages, e.g. debian-12
	Out    string // dist/ (must not exist)
	Log    io.Writer
}

func (o BuildOptions) validate() error {
	var errs []error
	if o.Version == "" || strings.ContainsAny(o.Version, "/ \t") {
		errs = append(errs, fmt.Errorf("version %q: want a non-empty version without slashes or blanks", o.Version))
	}
	if len(o.Commit) != 40 {
		errs = append(errs, fmt.Errorf("commit %q: want a full 40-hex git commit", o.Commit))
	}
	if o.TreeState != "clean" && o.TreeState != "dirty" {
		errs = append(errs, fmt.Errorf("tree state %q: want clean or dirty", o.TreeState))
	}
	if o.Command == "" || o.Work == "" || o.Out == "" || o.Distro == "" {
		errs = append(errs, errors.New("command, work, distro and out are required"))
	}
	if _, err := os.Stat(o.Out); err == nil {
		errs = append(errs, fmt.Errorf("%s exists: remove it first", o.Out))
	}
	for _, arch := range dist.Platforms {
		for _, b := range dist.Binaries {
			if _, err := os.Stat(filepath.Join(o.Work, arch, "bin", b)); err != nil {
				errs = append(errs, err)
			}
		}
		for _, f := range []string{"rootfs", "packages.json"} {
			if _, err := os.Stat(filepath.Join(o.Work, arch, f)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if o.Chart != "" && !strings.HasSuffix(o.Chart, ".tgz") {
		errs = append(errs, fmt.Errorf("chart %s: want a .tgz from helm package", o.Chart))
	}
	return errors.Join(errs...)
}

// Build writes everything but the signatures and checksums (Sign).
func Build(o BuildOptions) error {
	started := time.Now().UTC()
	if err := o.validate(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(o.Out, dist.SBOMDir), 0o755); err != nil {
		return err
	}
	var platforms []image.Platform
	for _, arch := range dist.Platforms {
		platforms = append(platforms, image.Platform{
			Arch:   arch,
			Rootfs: filepath.Join(o.Work, arch, "rootfs"),
			Bins:   filepath.Join(o.Work, arch, "bin"),
		})
	}
	built, err := image.Write(filepath.Join(o.Out, dist.OCI), image.Options{
		Version: o.Version, Commit: o.Commit, Source: strings.TrimPrefix(provenance.SourceURI, "git+"),
		SourceDate: o.SourceDate, Platforms: platforms,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Log, "image index %s\n", built.Index)
	subjects := []provenance.Subject{{Name: dist.ImageName + ":" + o.Version, Digest: digestMap(built.Index)}}
	var deps []provenance.ResourceDescriptor
	for _, arch := range dist.Platforms {
		m := built.Manifests[arch]
		fmt.Fprintf(o.Log, "  linux/%s %s\n", arch, m)
		subjects = append(subjects, provenance.Subject{Name: fmt.Sprintf("%s:%s linux/%s", dist.ImageName, o.Version, arch), Digest: digestMap(m)})
		pkgs, err := sbom.ReadPackages(filepath.Join(o.Work, arch, "packages.json"))
		if err != nil {
			return err
		}
		var bins []string
		for _, b := range dist.Binaries {
			bins = append(bins, filepath.Join(o.Work, arch, "bin", b))
		}
		bom, err := sbom.Build(sbom.Image{
			Name: dist.ImageName, Version: o.Version, Arch: arch, Manifest: m.String(), Distro: o.Distro,
			Binaries: bins, Packages: pkgs, SourceDate: o.SourceDate,
		})
		if err != nil {
			return fmt.Errorf("SBOM linux/%s: %w", arch, err)
		}
		if err := sbom.Write(filepath.Join(o.Out, dist.SBOM(arch)), bom); err != nil {
			return err
		}
		for _, p := range pkgs {
			deps = append(deps, provenance.ResourceDescriptor{
				URI:    fmt.Sprintf("pkg:deb/debian/%s@%s?arch=%s&distro=%s", p.Name, p.Version, p.Architecture, o.Distro),
				Name:   p.Deb,
				Digest: map[string]string{"sha256": p.SHA256},
			})
		}
	}
	for _, arch := range dist.Platforms {
		if err := addFileSubject(&subjects, o.Out, dist.SBOM(arch)); err != nil {
			return err
		}
	}
	if o.Chart != "" {
		rel := filepath.Join(dist.ChartDir, filepath.Base(o.Chart))
		if err := copyFile(o.Chart, filepath.Join(o.Out, rel)); err != nil {
			return err
		}
		if err := addFileSubject(&subjects, o.Out, rel); err != nil {
			return err
		}
	}
	platforms2 := make([]string, len(dist.Platforms))
	for i, a := range dist.Platforms {
		platforms2[i] = "linux/" + a
	}
	st := provenance.Statement{
		Type: provenance.StatementType, PredicateType: provenance.PredicateType, Subject: subjects,
		Predicate: provenance.Predicate{
			BuildDefinition: provenance.BuildDefinition{
				BuildType: provenance.BuildType,
				ExternalParameters: provenance.ExternalParameters{
					Version: o.Version, Command: o.Command, Platforms: platforms2,
					Source: provenance.Source{URI: provenance.SourceURI, Commit: o.Commit, TreeState: o.TreeState},
				},
				InternalParameters: map[string]string{
					"goVersion": runtime.Version(), "CGO_ENABLED": "0", "goflags": "-trimpath",
					"sourceDateEpoch": fmt.Sprint(o.SourceDate.Unix()),
				},
				ResolvedDependencies: append([]provenance.ResourceDescriptor{
					{URI: provenance.SourceURI + "@" + o.Commit, Digest: map[string]string{"gitCommit": o.Commit}},
				}, deps...),
			},
			RunDetails: provenance.RunDetails{
				Builder:  provenance.Builder{ID: provenance.BuilderID},
				Metadata: provenance.Metadata{StartedOn: started.Format(time.RFC3339), FinishedOn: time.Now().UTC().Format(time.RFC3339)},
			},
		},
	}
	return provenance.Write(filepath.Join(o.Out, dist.Provenance), st)
}

// Sign signs the image index manifest and the chart, then lists every file in
// SHA256SUMS and signs that list.
func Sign(ctx context.Context, c cosign.Cosign, out, key string) error {
	idx, err := IndexBlob(out)
	if err != nil {
		return err
	}
	if err := c.SignBlob(ctx, key, idx, filepath.Join(out, dist.IndexBundle)); err != nil {
		return err
	}
	charts, err := Charts(out)
	if err != nil {
		return err
	}
	for _, ch := range charts {
		if err := c.SignBlob(ctx, key, ch, ch+cosign.BundleExt); err != nil {
			return err
		}
	}
	if err := checksums.Write(out); err != nil {
		return err
	}
	return c.SignBlob(ctx, key, filepath.Join(out, checksums.File), filepath.Join(out, checksums.Signature))
}

// Charts lists the packaged charts of a release directory.
func Charts(out string) ([]string, error) {
	return filepath.Glob(filepath.Join(out, dist.ChartDir, "*.tgz"))
}

// IndexBlob is the file of the image index manifest the layout's index.json names:
// exactly one entry, an OCI image index.
func IndexBlob(out string) (string, error) {
	d, err := IndexDigest(out)
	if err != nil {
		return "", err
	}
	return filepath.Join(out, dist.OCI, "blobs", d.Algorithm, d.Hex), nil
}

// IndexDigest reads the digest of the one image index of the layout.
func IndexDigest(out string) (v1.Hash, error) {
	f, err := os.Open(filepath.Join(out, dist.OCI, "index.json"))
	if err != nil {
		return v1.Hash{}, err
	}
	defer f.Close()
	m, err := v1.ParseIndexManifest(f)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("%s/index.json: %w", dist.OCI, err)
	}
	if len(m.Manifests) != 1 {
		return v1.Hash{}, fmt.Errorf("%s/index.json: %d entries, want the one image index", dist.OCI, len(m.Manifests))
	}
	d := m.Manifests[0]
	if !d.MediaType.IsIndex() {
		return v1.Hash{}, fmt.Errorf("%s/index.json: entry is %s, want an image index", dist.OCI, d.MediaType)
	}
	if d.Digest.Algorithm != "sha256" {
		return v1.Hash{}, fmt.Errorf("%s/index.json: digest %s is not sha256", dist.OCI, d.Digest)
	}
	return d.Digest, nil
}

func digestMap(h v1.Hash) map[string]string { return map[string]string{h.Algorithm: h.Hex} }

func addFileSubject(s *[]provenance.Subject, out, rel string) error {
	d, err := checksums.FileDigest(filepath.Join(out, rel))
	if err != nil {
		return err
	}
	*s = append(*s, provenance.Subject{Name: filepath.ToSlash(rel), Digest: map[string]string{"sha256": d}})
	return nil
}

func copyFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o644)
}
