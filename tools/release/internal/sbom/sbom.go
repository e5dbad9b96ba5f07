// Package sbom writes a CycloneDX 1.6 JSON bill of materials for one platform image:
// the Go modules linked into each shipped binary, read from the binary's own build
// information (debug/buildinfo: exactly what the linker used, for any architecture),
// and the Debian packages of the image's root filesystem with the versions and .deb
// digests their control files and downloads give.
package sbom

import (
	"crypto/sha256"
	"debug/buildinfo"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// SpecVersion is the CycloneDX version written.
const SpecVersion = "1.6"

// DebPackage is one Debian package (test/cluster/images.DebPackage's JSON).
type DebPackage struct {
	Name         string `json:"name"`
	Version      string `json:"version"`
	Architecture string `json:"architecture"`
	Source       string `json:"source,omitempty"`
	Deb          string `json:"deb"`
	SHA256       string `json:"sha256"`
}

// ReadPackages reads product-rootfs's package list.
func ReadPackages(file string) ([]DebPackage, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var pkgs []DebPackage
	if err := json.Unmarshal(data, &pkgs); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("%s: no packages", file)
	}
	return pkgs, nil
}

// Image is what the SBOM describes.
type Image struct {
	Name       string // image name, e.g. metaconceal
	Version    string
	Arch       string
	Manifest   string // the platform image manifest digest, sha256:<hex>
	Distro     string // purl distro qualifier of the Debian packages, e.g. debian-12
	Binaries   []string
	Packages   []DebPackage
	SourceDate time.Time
}

// BOM is the subset of CycloneDX this package writes and Verify reads.
type BOM struct {
	BOMFormat    string       `json:"bomFormat"`
	SpecVersion  string       `json:"specVersion"`
	SerialNumber string       `json:"serialNumber"`
	Version      int          `json:"version"`
	Metadata     Metadata     `json:"metadata"`
	Components   []Component  `json:"components"`
	Dependencies []Dependency `json:"dependencies"`
}

type Metadata struct {
	Timestamp string    `json:"timestamp"`
	Tools     Tools     `json:"tools"`
	Component Component `json:"component"`
}

type Tools struct {
	Components []Component `json:"components"`
}

type Component struct {
	Type       string     `json:"type"`
	BOMRef     string     `json:"bom-ref,omitempty"`
	Name       string     `json:"name"`
	Version    string     `json:"version,omitempty"`
	PURL       string     `json:"purl,omitempty"`
	Hashes     []Hash     `json:"hashes,omitempty"`
	Properties []Property `json:"properties,omitempty"`
}

type Hash struct {
	Alg     string `json:"alg"`
	Content string `json:"content"`
}

type Property struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

type Dependency struct {
	Ref       string   `json:"ref"`
	DependsOn []string `json:"dependsOn,omitempty"`
}

// ImagePURL is the package URL of a platform image (purl type oci).
func ImagePURL(name, manifest, arch string) string {
	return "pkg:oci/" + name + "@" + url.PathEscape(manifest) + "?arch=" + arch
}

// Build assembles the SBOM.
func Build(im Image) (BOM, error) {
	hexDigest, ok := strings.CutPrefix(im.Manifest, "sha256:")
	if !ok {
		return BOM{}, fmt.Errorf("manifest digest %q is not sha256", im.Manifest)
	}
	imageRef := ImagePURL(im.Name, im.Manifest, im.Arch)
	b := BOM{
		BOMFormat:    "CycloneDX",
		SpecVersion:  SpecVersion,
		SerialNumber: "urn:uuid:" + uuidFrom(imageRef),
		Version:      1,
		Metadata: Metadata{
			Timestamp: im.SourceDate.UTC().Format(time.RFC3339),
			Tools:     Tools{Components: []Component{{Type: "application", Name: "metaconceal mcrelease (tools/release)"}}},
			Component: Component{
				Type: "container", BOMRef: imageRef, Name: im.Name, Version: im.Version, PURL: imageRef,
				Hashes:     []Hash{{Alg: "SHA-256", Content: hexDigest}},
				Properties: []Property{{Name: "oci:platform", Value: "linux/" + im.Arch}},
			},
		},
	}
	seen := map[string]bool{}
	add := func(c Component) {
		if !seen[c.BOMRef] {
			seen[c.BOMRef] = true
			b.Components = append(b.Components, c)
		}
	}
	imageDeps := []string{}
	for _, bin := range im.Binaries {
		info, err := buildinfo.ReadFile(bin)
		if err != nil {
			return BOM{}, fmt.Errorf("build information of %s: %w", bin, err)
		}
		name := filepath.Base(bin)
		data, err := os.ReadFile(bin)
		if err != nil {
			return BOM{}, err
		}
		sum := sha256.Sum256(data)
		binRef := "file:/" + "metaconceal/" + name
		mainRef := "pkg:golang/" + info.Main.Path + "@" + im.Version
		props := []Property{{Name: "go:version", Value: info.GoVersion}, {Name: "go:package", Value: info.Path}}
		for _, s := range info.Settings {
			if s.Key == "GOARCH" || s.Key == "GOOS" || s.Key == "CGO_ENABLED" || s.Key == "-ldflags" {
				props = append(props, Property{Name: "go:build:" + s.Key, Value: s.Value})
			}
		}
		add(Component{Type: "application", BOMRef: binRef, Name: "/metaconceal/" + name, Version: im.Version,
			Hashes: []Hash{{Alg: "SHA-256", Content: hex.EncodeToString(sum[:])}}, Properties: props})
		add(Component{Type: "library", BOMRef: mainRef, Name: info.Main.Path, Version: im.Version, PURL: mainRef})
		std := "pkg:golang/stdlib@" + info.GoVersion
		add(Component{Type: "library", BOMRef: std, Name: "stdlib", Version: info.GoVersion, PURL: std})
		deps := []string{mainRef, std}
		for _, m := range info.Deps {
			if m.Replace != nil {
				m = m.Replace
			}
			ref := "pkg:golang/" + m.Path + "@" + m.Version
			c := Component{Type: "library", BOMRef: ref, Name: m.Path, Version: m.Version, PURL: ref}
			if h, ok := strings.CutPrefix(m.Sum, "h1:"); ok {
				if raw, err := base64.StdEncoding.DecodeString(h); err == nil {
					c.Hashes = []Hash{{Alg: "SHA-256", Content: hex.EncodeToString(raw)}}
				}
			}
			add(c)
			deps = append(deps, ref)
		}
		sort.Strings(deps)
		b.Dependencies = append(b.Dependencies, Dependency{Ref: binRef, DependsOn: deps})
		imageDeps = append(imageDeps, binRef)
	}
	for _, p := range im.Packages {
		q := url.Values{"arch": {p.Architecture}, "distro": {im.Distro}}
		ref := "pkg:deb/debian/" + p.Name + "@" + url.PathEscape(p.Version) + "?" + q.Encode()
		c := Component{Type: "library", BOMRef: ref, Name: p.Name, Version: p.Version, PURL: ref,
			Hashes: []Hash{{Alg: "SHA-256", Content: p.SHA256}}}
		if p.Source != "" {
			c.Properties = []Property{{Name: "deb:source", Value: p.Source}}
		}
		add(c)
		imageDeps = append(imageDeps, ref)
	}
	b.Dependencies = append([]Dependency{{Ref: imageRef, DependsOn: imageDeps}}, b.Dependencies...)
	return b, nil
}

// uuidFrom is a name-based (version 5 style, SHA-256 truncated) UUID, so the same
// image always gets the same serial number.
func uuidFrom(name string) string {
	s := sha256.Sum256([]byte("metaconceal-sbom:" + name))
	s[6] = (s[6] & 0x0f) | 0x50
	s[8] = (s[8] & 0x3f) | 0x80
	h := hex.EncodeToString(s[:16])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// Write writes the SBOM as indented JSON.
func Write(file string, b BOM) error {
	data, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(file, append(data, '\n'), 0o644)
}

// Read reads an SBOM and checks it is CycloneDX.
func Read(file string) (BOM, error) {
	var b BOM
	data, err := os.ReadFile(file)
	if err != nil {
		return b, err
	}
	if err := json.Unmarshal(data, &b); err != nil {
		return b, fmt.Errorf("%s: %w", file, err)
	}
	if b.BOMFormat != "CycloneDX" || b.SpecVersion != SpecVersion {
		return b, fmt.Errorf("%s: not a CycloneDX %s document (%q %q)", file, SpecVersion, b.BOMFormat, b.SpecVersion)
	}
	return b, nil
}
