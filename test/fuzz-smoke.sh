#!/usr/bin/env bash
# Runs every Fuzz target of the module for a short time (FUZZTIME, default 10s each):
# the committed corpus under testdata/fuzz is replayed first, then new inputs are tried.
set -euo pipefail
fuzztime=${FUZZTIME:-10s}
found=0
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		found=1
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
	done
done
if [ "$found" = 0 ]; then
	echo "fuzz: no Fuzz targets found: the policy must have one" >&2
	exit 1
fi
