package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"
)

// PauseImageRef is the name the locally built sandbox image is imported under; the
// containerd config's sandbox_image points at it, so containerd never tries a registry.
const PauseImageRef = "localhost/metaconceal/pause:e2e"

// BuildPauseBinary compiles the static pause program (test/e2e/pause) into dir.
func BuildPauseBinary(ctx context.Context, moduleRoot, dir string) (string, error) {
	out := filepath.Join(dir, "pause")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./test/e2e/pause")
	cmd.Dir = moduleRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build pause binary: %w: %s", err, msg)
	}
	return out, nil
}

// WritePauseArchive packs the binary at binaryPath as /pause in a one-layer image and
// writes it as a docker-archive tar (what `ctr images import` reads) to archivePath:
// <layer>/layer.tar, a config JSON whose rootfs.diff_ids is the layer's sha256, and
// manifest.json naming the config, the tag and the layer.
func WritePauseArchive(binaryPath, archivePath, ref string) error {
	binary, err := os.ReadFile(binaryPath)
	if err != nil {
		return fmt.Errorf("read pause binary: %w", err)
	}
	// Fixed timestamps make the image (and so its digest) depend on the binary alone.
	epoch := time.Unix(0, 0).UTC()
	layer, err := tarFiles([]tarEntry{{name: "pause", mode: 0o755, data: binary, modTime: epoch}})
	if err != nil {
		return fmt.Errorf("pack pause layer: %w", err)
	}
	layerSum := sha256.Sum256(layer)
	layerHex := hex.EncodeToString(layerSum[:])

	config := map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"created":      epoch.Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": []string{"/pause"},
			"WorkingDir": "/",
		},
		"rootfs": map[string]any{
			"type":     "layers",
			"diff_ids": []string{"sha256:" + layerHex},
		},
	}
	configJSON, err := json.Marshal(config)
	if err != nil {
		return fmt.Errorf("encode image config: %w", err)
	}
	configSum := sha256.Sum256(configJSON)
	configName := hex.EncodeToString(configSum[:]) + ".json"
	layerName := layerHex + "/layer.tar"

	manifest := []map[string]any{{
		"Config":   configName,
		"RepoTags": []string{ref},
		"Layers":   []string{layerName},
	}}
	manifestJSON, err := json.Marshal(manifest)
	if err != nil {
		return fmt.Errorf("encode image manifest: %w", err)
	}

	archive, err := tarFiles([]tarEntry{
		{name: layerHex + "/", dir: true, mode: 0o755, modTime: epoch},
		{name: layerName, mode: 0o644, data: layer, modTime: epoch},
		{name: configName, mode: 0o644, data: configJSON, modTime: epoch},
		{name: "manifest.json", mode: 0o644, data: manifestJSON, modTime: epoch},
	})
	if err != nil {
		return fmt.Errorf("pack image archive: %w", err)
	}
	if err := os.WriteFile(archivePath, archive, 0o644); err != nil {
		return fmt.Errorf("write image archive %s: %w", archivePath, err)
	}
	return nil
}

type tarEntry struct {
	name    string
	dir     bool
	mode    int64
	data    []byte
	modTime time.Time
}

func tarFiles(entries []tarEntry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Mode: e.mode, ModTime: e.modTime, Format: tar.FormatPAX}
		if e.dir {
			hdr.Typeflag = tar.TypeDir
		} else {
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if !e.dir {
			if _, err := tw.Write(e.data); err != nil {
				return nil, fmt.Errorf("tar data %s: %w", e.name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	return buf.Bytes(), nil
}
