// Package dist names what a release directory (dist/) holds; docs/release.md shows it.
//
//	oci/                        OCI image layout: the image index (both platforms)
//	index.sigstore.json         cosign bundle: signature over the image index manifest
//	sbom/linux-<arch>.cdx.json  CycloneDX SBOM of each platform image
//	provenance.intoto.json      in-toto statement, SLSA provenance v1
//	chart/<name>-<ver>.tgz      the packaged Helm chart (when the chart exists)
//	chart/<...>.tgz.sigstore.json  cosign bundle: signature over the chart
//	SHA256SUMS                  every file above
//	SHA256SUMS.sigstore.json    cosign bundle: signature over SHA256SUMS
package dist

import (
	"fmt"
	"path/filepath"

	"github.com/metaconceal/metaconceal/tools/release/internal/cosign"
)

const (
	OCI         = "oci"
	IndexBundle = "index" + cosign.BundleExt
	Provenance  = "provenance.intoto.json"
	ChartDir    = "chart"
	SBOMDir     = "sbom"
	ImageName   = "metaconceal"
	// RefNameAnnotation carries the version on the layout's index.json entry.
	RefNameAnnotation = "org.opencontainers.image.ref.name"
)

// Platforms are the architectures every release holds.
var Platforms = []string{"amd64", "arm64"}

// Binaries are the programs each image holds under /metaconceal/ (conf/Dockerfile).
var Binaries = []string{"metaconceal", "metaconceal-proxy", "metaconceal-install"}

// SBOM is the path of a platform's SBOM, relative to dist/.
func SBOM(arch string) string {
	return filepath.Join(SBOMDir, fmt.Sprintf("linux-%s.cdx.json", arch))
}
