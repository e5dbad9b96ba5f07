// Package cosign runs the cosign binary (built from the pinned module of this tools
// module) to sign and verify blobs with a key pair, offline: no transparency log, no
// signing config or trusted root fetched, signatures written as Sigstore bundles.
package cosign

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// BundleExt is the extension of a signature bundle written beside what it signs.
const BundleExt = ".sigstore.json"

// Cosign is one cosign binary.
type Cosign struct {
	Path string
}

// SignBlob signs blob with the private key file (its password comes from
// COSIGN_PASSWORD in the environment) and writes the bundle to bundle.
func (c Cosign) SignBlob(ctx context.Context, key, blob, bundle string) error {
	return c.run(ctx, "sign-blob", "--yes", "--key", key,
		"--use-signing-config=false", "--tlog-upload=false",
		"--bundle", bundle, blob)
}

// VerifyBlob checks that bundle holds a valid signature over blob by the public key
// file, without a transparency log.
func (c Cosign) VerifyBlob(ctx context.Context, pub, blob, bundle string) error {
	return c.run(ctx, "verify-blob", "--key", pub, "--insecure-ignore-tlog=true",
		"--bundle", bundle, blob)
}

func (c Cosign) run(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, c.Path, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("cosign %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
