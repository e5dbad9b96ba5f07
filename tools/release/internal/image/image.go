// Package image builds the release's multi-platform image as an OCI image layout with
// go-containerregistry: per platform, one layer with the Debian root filesystem and one
// with the metaconceal binaries under /metaconceal/, joined in one OCI image index.
// Every timestamp is the source date, every owner root, so the digests depend on the
// inputs alone.
package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinDir is where the binaries live in the image (conf/Dockerfile).
const BinDir = "metaconceal"

// Entrypoint is the image's entrypoint (conf/Dockerfile).
const Entrypoint = "/metaconceal/metaconceal-proxy"

// Platform is one image of the index.
type Platform struct {
	Arch   string // GOARCH and Debian architecture: amd64, arm64
	Rootfs string // the Debian root filesystem (product-rootfs)
	Bins   string // directory of the binaries to put under /metaconceal/
}

// Options describe the index.
type Options struct {
	Version    string
	Commit     string
	Source     string // org.opencontainers.image.source
	SourceDate time.Time
	Platforms  []Platform
}

// Built is what Write produced.
type Built struct {
	Index     v1.Hash
	Manifests map[string]v1.Hash // arch -> image manifest digest
}

// Write builds the index and writes it as an OCI image layout at dir (created; must
// not exist), with the version as its reference name.
func Write(dir string, o Options) (Built, error) {
	b := Built{Manifests: map[string]v1.Hash{}}
	if _, err := os.Stat(dir); err == nil {
		return b, fmt.Errorf("%s exists", dir)
	}
	annotations := map[string]string{
		"org.opencontainers.image.version":  o.Version,
		"org.opencontainers.image.revision": o.Commit,
		"org.opencontainers.image.source":   o.Source,
		"org.opencontainers.image.created":  o.SourceDate.UTC().Format(time.RFC3339),
		"org.opencontainers.image.title":    "metaconceal",
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range o.Platforms {
		img, err := platformImage(p, o, annotations)
		if err != nil {
			return b, fmt.Errorf("linux/%s: %w", p.Arch, err)
		}
		d, err := img.Digest()
		if err != nil {
			return b, err
		}
		b.Manifests[p.Arch] = d
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: p.Arch}},
		})
	}
	idx = mutate.Annotations(idx, annotations).(v1.ImageIndex)
	d, err := idx.Digest()
	if err != nil {
		return b, err
	}
	b.Index = d
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return b, fmt.Errorf("layout %s: %w", dir, err)
	}
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": o.Version,
	})); err != nil {
		return b, fmt.Errorf("write index to %s: %w", dir, err)
	}
	return b, nil
}

func platformImage(p Platform, o Options, annotations map[string]string) (v1.Image, error) {
	base, err := tarLayer(p.Rootfs, "", o.SourceDate)
	if err != nil {
		return nil, err
	}
	bins, err := tarLayer(p.Bins, BinDir, o.SourceDate)
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.AppendLayers(img, base, bins)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", p.Arch
	cfg.Created = v1.Time{Time: o.SourceDate.UTC()}
	cfg.Config.Entrypoint = []string{Entrypoint}
	cfg.Config.WorkingDir = "/"
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cfg.Config.Labels = annotations
	for i := range cfg.History {
		cfg.History[i].Created = v1.Time{Time: o.SourceDate.UTC()}
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, err
	}
	return mutate.Annotations(img, annotations).(v1.Image), nil
}

// tarLayer packs dir (under prefix in the layer, when set) as a gzip OCI layer: every
// entry owned by root, modes and symlink targets as on disk, hard links kept as links,
// mtime the source date.
func tarLayer(dir, prefix string, mtime time.Time) (v1.Layer, error) {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk %s: %w", dir, err)
	}
	sort.Strings(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime = mtime.UTC()
	if prefix != "" {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: prefix + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	type inode struct{ dev, ino uint64 }
	seen := map[inode]string{}
	for _, p := range paths {
		rel, _ := filepath.Rel(dir, p)
		if prefix != "" {
			rel = filepath.Join(prefix, rel)
		}
		info, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return nil, err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = mtime, time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		if info.Mode().IsRegular() {
			if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
				key := inode{uint64(st.Dev), st.Ino}
				if first, dup := seen[key]; dup {
					hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				} else {
					seen[key] = hdr.Name
				}
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if hdr.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return nil, err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
}
