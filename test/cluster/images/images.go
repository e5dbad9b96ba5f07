// Package images builds the cluster e2e's container images without Docker, as
// docker-archive tars that `ctr images import` (local provider) and `kind load
// image-archive` (kind provider) read:
//
//   - the production image, with conf/Dockerfile's contents: the plugin,
//     metaconceal-proxy and metaconceal-install under /metaconceal/, plus Debian 12's
//     iptables and iproute2 with what they depend on (apt-get download + dpkg -x, and
//     what the packages' maintainer scripts would have set up: the iptables
//     alternatives and the dynamic linker's cache), tagged as conf/deploy names it;
//   - the same programs under a second tag (and a label, so it is a different image),
//     for the rolling update;
//   - the probe image: Debian's busybox-static as /bin/sh and friends, plus /probe;
//   - the fake metadata server's own test image (busybox for `ip`, plus
//     /fake-gce-metadata), for providers that run it as a pod (kind).
//
// The archives are written by test/cluster/tools' ociarchive (go-containerregistry).
package images

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
)

// Image references. conf/deploy names metaconceal:dev.
const (
	MetaconcealRef = "metaconceal:dev"
	UpdateRef      = "metaconceal:e2e-update"
	ProbeRef       = "localhost/metaconceal-e2e/probe:1"
	FakeGCERef     = "localhost/metaconceal-e2e/fake-gce-metadata:1"
)

// ProductPackages are the Debian packages conf/Dockerfile installs on debian:12-slim;
// the image gets them with their Depends/Pre-Depends closure. coreutils and dash are in
// debian:12-slim already: the uninstall DaemonSet's idle container runs `sleep`.
var ProductPackages = []string{"iptables", "iproute2", "coreutils", "dash", "base-files"}

// ProductBinaries are the programs conf/Dockerfile copies to /metaconceal/.
var ProductBinaries = []string{"metaconceal", "metaconceal-proxy", "metaconceal-install"}

// Builder builds the archives.
type Builder struct {
	BinDir     string // bin/: the product binaries and fake-gce-metadata
	OCIArchive string // the ociarchive program (bin/cluster/ociarchive)
	Probe      string // the probe binary (static)
	DebCache   string // where downloaded .deb files are kept between runs
	WorkDir    string // scratch space for the root filesystems (removed by the caller)
	Log        io.Writer
}

// Archives are the written docker-archive tars.
type Archives struct {
	Metaconceal string // MetaconcealRef
	Update      string // UpdateRef
	Probe       string // ProbeRef
	FakeGCE     string // FakeGCERef
}

// All lists the archives.
func (a Archives) All() []string { return []string{a.Metaconceal, a.Update, a.Probe, a.FakeGCE} }

// Build writes every archive into WorkDir.
func (b *Builder) Build(ctx context.Context) (Archives, error) {
	var a Archives
	for _, f := range append([]string{b.OCIArchive, b.Probe}, b.binaries(ProductBinaries...)...) {
		if _, err := os.Stat(f); err != nil {
			return a, fmt.Errorf("image input missing (run make build cluster-tools): %w", err)
		}
	}
	closure, err := debClosure(ctx, ProductPackages)
	if err != nil {
		return a, err
	}
	debs, err := b.download(ctx, append(closure, "busybox-static"))
	if err != nil {
		return a, err
	}

	// Production image.
	root := filepath.Join(b.WorkDir, "rootfs-metaconceal")
	if err := extract(ctx, root, debs, closure); err != nil {
		return a, err
	}
	if err := postInstall(ctx, root); err != nil {
		return a, err
	}
	for _, name := range ProductBinaries {
		if err := copyFile(filepath.Join(b.BinDir, name), filepath.Join(root, "metaconceal", name), 0o755); err != nil {
			return a, err
		}
	}
	a.Metaconceal = filepath.Join(b.WorkDir, "metaconceal.tar")
	if err := b.write(ctx, root, a.Metaconceal, MetaconcealRef, "/metaconceal/metaconceal-proxy"); err != nil {
		return a, err
	}
	a.Update = filepath.Join(b.WorkDir, "metaconceal-update.tar")
	if err := b.write(ctx, root, a.Update, UpdateRef, "/metaconceal/metaconceal-proxy", "--label=io.metaconceal.e2e.build=update"); err != nil {
		return a, err
	}

	// Probe image and fake metadata image: busybox-static plus one program.
	for _, img := range []struct {
		name, ref, src, dst string
		out                 *string
	}{
		{"probe", ProbeRef, b.Probe, "probe", &a.Probe},
		{"fake-gce-metadata", FakeGCERef, filepath.Join(b.BinDir, "fake-gce-metadata"), "fake-gce-metadata", &a.FakeGCE},
	} {
		root := filepath.Join(b.WorkDir, "rootfs-"+img.name)
		if err := extract(ctx, root, debs, []string{"busybox-static"}); err != nil {
			return a, err
		}
		if err := busyboxLinks(ctx, root); err != nil {
			return a, err
		}
		if err := copyFile(img.src, filepath.Join(root, img.dst), 0o755); err != nil {
			return a, err
		}
		*img.out = filepath.Join(b.WorkDir, img.name+".tar")
		if err := b.write(ctx, root, *img.out, img.ref, "/"+img.dst); err != nil {
			return a, err
		}
	}
	return a, nil
}

func (b *Builder) binaries(names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = filepath.Join(b.BinDir, n)
	}
	return out
}

func (b *Builder) write(ctx context.Context, root, out, ref, entrypoint string, extra ...string) error {
	args := append([]string{"--rootfs", root, "--out", out, "--tag", ref, "--entrypoint", entrypoint}, extra...)
	if _, err := run(ctx, b.OCIArchive, args...); err != nil {
		return err
	}
	fmt.Fprintf(b.Log, "    image %s -> %s\n", ref, out)
	return nil
}

// debClosure is the Depends/Pre-Depends closure of pkgs (no Recommends), as apt
// resolves it on this Debian release; for an alternative (a | b) apt-cache lists every
// choice, so the closure may hold a few packages the image does not strictly need.
func debClosure(ctx context.Context, pkgs []string) ([]string, error) {
	if _, err := run(ctx, "apt-cache", "show", pkgs[0]); err != nil {
		if _, err := run(ctx, "apt-get", "update", "-qq"); err != nil {
			return nil, fmt.Errorf("no apt lists and apt-get update failed: %w", err)
		}
	}
	args := append([]string{"depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
		"--no-breaks", "--no-replaces", "--no-enhances"}, pkgs...)
	out, err := run(ctx, "apt-cache", args...)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for _, line := range strings.Split(out, "\n") {
		// Package names start a line; dependency lines are indented; virtual ones are <name>.
		// With a foreign architecture enabled (dpkg --add-architecture), apt also lists
		// arch-qualified names (debianutils:arm64): the image is the native one.
		if line == "" || line[0] == ' ' || line[0] == '<' || strings.Contains(line, ":") {
			continue
		}
		set[strings.TrimSpace(line)] = true
	}
	var names []string
	for n := range set {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) < len(pkgs) {
		return nil, fmt.Errorf("apt-cache depends gave %d packages for %v", len(names), pkgs)
	}
	return names, nil
}

// download fetches each package's .deb into the cache (once) and returns name -> file.
func (b *Builder) download(ctx context.Context, pkgs []string) (map[string]string, error) {
	if err := os.MkdirAll(b.DebCache, 0o755); err != nil {
		return nil, err
	}
	debs := map[string]string{}
	var missing []string
	for _, p := range pkgs {
		if m := nativeDebs(b.DebCache, p); len(m) > 0 {
			sort.Strings(m)
			debs[p] = m[len(m)-1]
		} else {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(b.Log, "    apt-get download %d packages into %s\n", len(missing), b.DebCache)
		cmd := exec.CommandContext(ctx, "apt-get", append([]string{"download", "-qq"}, missing...)...)
		cmd.Dir = b.DebCache
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("apt-get download %s: %w: %s", strings.Join(missing, " "), err, out)
		}
		for _, p := range missing {
			m := nativeDebs(b.DebCache, p)
			if len(m) == 0 {
				return nil, fmt.Errorf("apt-get download left no .deb for %s in %s", p, b.DebCache)
			}
			debs[p] = m[0]
		}
	}
	return debs, nil
}

func extract(ctx context.Context, root string, debs map[string]string, pkgs []string) error {
	if err := os.RemoveAll(root); err != nil {
		return err
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	for _, p := range pkgs {
		deb, ok := debs[p]
		if !ok {
			return fmt.Errorf("no .deb for %s", p)
		}
		if _, err := run(ctx, "dpkg-deb", "-x", deb, root); err != nil {
			return err
		}
	}
	for _, d := range []string{"tmp", "run", "proc", "sys", "dev", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	return os.Chmod(filepath.Join(root, "tmp"), 0o1777)
}

// postInstall does what the packages' maintainer scripts would: iptables' postinst
// registers alternatives (iptables -> iptables-nft, Debian 12's default), and
// libc-bin's trigger builds the linker cache.
func postInstall(ctx context.Context, root string) error {
	for _, name := range []string{"iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save"} {
		nft := strings.Replace(name, "tables", "tables-nft", 1)
		if _, err := os.Stat(filepath.Join(root, "usr/sbin", nft)); err != nil {
			return fmt.Errorf("iptables package without %s: %w", nft, err)
		}
		alt := filepath.Join(root, "etc/alternatives", name)
		if err := os.MkdirAll(filepath.Dir(alt), 0o755); err != nil {
			return err
		}
		if err := os.Symlink("/usr/sbin/"+nft, alt); err != nil {
			return err
		}
		if err := os.Symlink("/etc/alternatives/"+name, filepath.Join(root, "usr/sbin", name)); err != nil {
			return err
		}
	}
	conf := filepath.Join(root, "etc/ld.so.conf")
	if err := os.WriteFile(conf, []byte("include /etc/ld.so.conf.d/*.conf\n"), 0o644); err != nil {
		return err
	}
	if _, err := run(ctx, "ldconfig", "-r", root); err != nil {
		return err
	}
	return nil
}

// busyboxLinks makes /bin/<applet> links to busybox, as `busybox --install -s` would.
func busyboxLinks(ctx context.Context, root string) error {
	bb := filepath.Join(root, "bin/busybox")
	out, err := run(ctx, bb, "--list")
	if err != nil {
		return err
	}
	for _, applet := range strings.Fields(out) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		link := filepath.Join(root, "bin", applet)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink("busybox", link); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, data, mode)
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// nativeDebs are the cached .deb files of package p for this machine's architecture
// (Debian's names for amd64 and arm64 are Go's) or for all: with a foreign
// architecture enabled the cache may also hold other architectures' files of p.
func nativeDebs(cache, p string) []string {
	var out []string
	for _, arch := range []string{runtime.GOARCH, "all"} {
		m, _ := filepath.Glob(filepath.Join(cache, p+"_*_"+arch+".deb"))
		out = append(out, m...)
	}
	return out
}
