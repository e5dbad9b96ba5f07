#!/usr/bin/env bash
# Runs Fuzz targets for a short time each (FUZZTIME, default 10s): the committed corpus
# under testdata/fuzz is replayed first, then new inputs are tried. FUZZ_TARGETS, a
# regexp, picks targets by name (default: all). The policy's leak property must be
# among them whenever it matches the regexp's selection.
set -euo pipefail
fuzztime=${FUZZTIME:-10s}
select=${FUZZ_TARGETS:-.}
required=FuzzProxyNeverLeaksConcealed
ran=()
for pkg in $(go list ./...); do
	# A package whose tests do not compile must fail here, not be passed over.
	listing=$(go test -list '^Fuzz' "$pkg")
	for target in $(grep '^Fuzz' <<<"$listing" | grep -E -- "$select" || true); do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
		ran+=("$target")
	done
done
if [[ " ${ran[*]-} " != *" $required "* ]] && grep -qE -- "$select" <<<"$required"; then
	echo "fuzz: $required did not run: the policy's leak property must be fuzzed" >&2
	exit 1
fi
if [ ${#ran[@]} -eq 0 ]; then
	echo "fuzz: no Fuzz target matched '$select'" >&2
	exit 1
fi
echo "fuzz: ran ${#ran[@]} target(s): ${ran[*]}"
