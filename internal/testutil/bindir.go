package testutil

import (
	"errors"
	"os"
	"path/filepath"
)

// BinDirEnv names the variable that says where `make build` put the binaries.
const BinDirEnv = "METACONCEAL_BIN"

// BinDir returns where the built binaries are: $METACONCEAL_BIN (the Makefile sets it),
// else bin/ at the module root found above the working directory.
func BinDir() (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin"), nil
}

// ModuleRoot returns the directory of the go.mod above the working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory; set " + BinDirEnv)
		}
		dir = parent
	}
}
