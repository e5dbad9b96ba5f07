// Package testutil holds helpers shared by the project's tests.
package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// RequirePrivilegedEnv names the variable that turns a privileged test's skip into a
// failure. .ci/run sets it: CI runs as root, so a skip there means a test did not run.
const RequirePrivilegedEnv = "METACONCEAL_REQUIRE_PRIVILEGED"

// RequirePrivileged skips the test, saying why, when it cannot create network
// namespaces and program iptables (not root, or a tool missing). With
// METACONCEAL_REQUIRE_PRIVILEGED=1 in the environment it fails instead.
// tools are extra executables the test needs on PATH (for example "ip", "iptables").
func RequirePrivileged(t testing.TB, tools ...string) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "needs root to create network namespaces and program iptables"
	}
	if reason == "" {
		for _, tool := range tools {
			if _, err := exec.LookPath(tool); err != nil {
				reason = "needs " + tool + " on PATH: " + err.Error()
				break
			}
		}
	}
	if reason == "" {
		return
	}
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		t.Fatalf("privileged test cannot run (%s) and %s=1 forbids skipping it", reason, RequirePrivilegedEnv)
	}
	t.Skip("privileged test skipped: " + reason + " (set " + RequirePrivilegedEnv + "=1 to make this a failure)")
}
