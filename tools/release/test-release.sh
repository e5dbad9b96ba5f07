#!/usr/bin/env bash
# make test-release: cut a release with a throwaway cosign key pair, verify it with
# make verify-release, then run tools/release's tests on it (verify_test.go: a tampered
# byte in any artifact, a wrong key, an extra or a missing file must fail). Prints the
# time of each phase.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export COSIGN_PASSWORD=test-release-only
cosign=$repo/bin/tools/cosign

phase() { echo "phase test-release/$1 $(( $(date +%s) - $2 ))s"; }

start=$(date +%s)
(cd "$tmp" && "$cosign" generate-key-pair >/dev/null)
make --no-print-directory release VERSION=0.0.0-test SIGNING_KEY="$tmp/cosign.key" \
	RELEASE_DIST="$tmp/dist" ALLOW_DIRTY="${ALLOW_DIRTY:-0}"
phase release "$start"

start=$(date +%s)
make --no-print-directory verify-release PUBLIC_KEY="$tmp/cosign.pub" RELEASE_DIST="$tmp/dist"
phase verify-release "$start"

start=$(date +%s)
(cd tools/release && METACONCEAL_RELEASE_DIST="$tmp/dist" \
	METACONCEAL_RELEASE_SIGNING_KEY="$tmp/cosign.key" METACONCEAL_RELEASE_PUBLIC_KEY="$tmp/cosign.pub" \
	METACONCEAL_COSIGN="$cosign" METACONCEAL_REPO="$repo" \
	go test -count=1 ./...)
phase tamper-tests "$start"
du -sh "$tmp/dist"
