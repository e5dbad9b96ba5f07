#!/usr/bin/env bash
# Installs, from Debian's packages, what the tests, the demo and the runtime e2e need,
# and only what is missing (so a warm machine pays nothing). Needs root.
set -euo pipefail

want=(iptables:iptables ip:iproute2 curl:curl nsenter:util-linux)
if [ "${1:-}" = "--runtime" ]; then
	want+=(containerd:containerd runc:runc ctr:containerd)
fi
missing=()
for pair in "${want[@]}"; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
# iptables-legacy comes with the iptables package; check it too for the legacy tests.
command -v iptables-legacy >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing ${missing[*]} and not root: install them or run as root" >&2
	exit 1
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${pkgs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
