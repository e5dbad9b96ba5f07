// Command mcrelease writes and verifies metaconceal releases (docs/release.md):
//
//	mcrelease build  --version V --commit SHA --tree-state clean|dirty --command CMD \
//	                 --source-date-epoch N --work DIR --distro debian-12 --out dist [--chart X.tgz]
//	mcrelease sign   --dist dist --key cosign.key --cosign bin/tools/cosign
//	mcrelease verify --dist dist --key cosign.pub --cosign bin/tools/cosign
//
// make release and make verify-release run it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/metaconceal/metaconceal/tools/release/internal/cosign"
	"github.com/metaconceal/metaconceal/tools/release/internal/release"
	"github.com/metaconceal/metaconceal/tools/release/internal/verify"
)

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mcrelease:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("want a subcommand: build, sign or verify")
	}
	fs := flag.NewFlagSet("mcrelease "+args[0], flag.ContinueOnError)
	switch args[0] {
	case "build":
		var o release.BuildOptions
		var epoch int64
		fs.StringVar(&o.Version, "version", "", "release version")
		fs.StringVar(&o.Commit, "commit", "", "source commit (40 hex)")
		fs.StringVar(&o.TreeState, "tree-state", "", "clean or dirty")
		fs.StringVar(&o.Command, "command", "", "the build command, recorded in the provenance")
		fs.Int64Var(&epoch, "source-date-epoch", -1, "timestamp of every file and of the images (the commit's time)")
		fs.StringVar(&o.Work, "work", "", "directory with <arch>/rootfs, <arch>/packages.json, <arch>/bin/")
		fs.StringVar(&o.Distro, "distro", "", "purl distro of the Debian packages (debian-12)")
		fs.StringVar(&o.Chart, "chart", "", "packaged chart (.tgz); empty: none")
		fs.StringVar(&o.Out, "out", "", "release directory to create")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if epoch < 0 {
			return errors.New("--source-date-epoch is required")
		}
		o.SourceDate = time.Unix(epoch, 0).UTC()
		o.Log = os.Stdout
		return release.Build(o)
	case "sign", "verify":
		dir := fs.String("dist", "", "release directory")
		key := fs.String("key", "", "cosign private key (sign; password in COSIGN_PASSWORD) or public key (verify)")
		bin := fs.String("cosign", "", "cosign binary")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *dir == "" || *key == "" || *bin == "" {
			return errors.New("--dist, --key and --cosign are required")
		}
		for _, f := range []string{*dir, *key, *bin} {
			if _, err := os.Stat(f); err != nil {
				return err
			}
		}
		c := cosign.Cosign{Path: *bin}
		if args[0] == "sign" {
			return release.Sign(ctx, c, *dir, *key)
		}
		if err := verify.Verify(ctx, verify.Options{Dist: *dir, PublicKey: *key, Cosign: c, Log: os.Stdout}); err != nil {
			return fmt.Errorf("release %s does NOT verify: %w", *dir, err)
		}
		fmt.Printf("release %s verifies with %s\n", *dir, *key)
		return nil
	}
	return fmt.Errorf("unknown subcommand %q: want build, sign or verify", args[0])
}
