// Command product-rootfs writes the production image's Debian root filesystem for one
// architecture (images.ProductRootfs: conf/Dockerfile's iptables and iproute2 with their
// dependency closure, Debian's packages of that architecture) and a JSON list of the
// packages it holds, which the release (tools/release) turns into the image's layer,
// SBOM and provenance.
//
//	product-rootfs --arch arm64 --root DIR --packages FILE [--deb-cache DIR]
//
// A foreign architecture needs `dpkg --add-architecture <arch>` and `apt-get update`
// first (make release does both).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/metaconceal/metaconceal/test/cluster/images"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "product-rootfs:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("product-rootfs", flag.ContinueOnError)
	arch := fs.String("arch", "", "Debian architecture (amd64, arm64)")
	root := fs.String("root", "", "directory to write the root filesystem into (emptied first)")
	pkgsOut := fs.String("packages", "", "JSON file to write the package list to")
	cache := fs.String("deb-cache", "", "where downloaded .deb files are kept (default: <root>.debs)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *arch == "" || *root == "" || *pkgsOut == "" {
		return errors.New("--arch, --root and --packages are required")
	}
	if *cache == "" {
		*cache = *root + ".debs"
	}
	pkgs, err := images.ProductRootfs(context.Background(), *arch, *root, *cache, os.Stdout)
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(pkgs, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(*pkgsOut, append(data, '\n'), 0o644)
}
