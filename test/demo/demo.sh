#!/usr/bin/env bash
# metaconceal demo: one simulated GCE node, two pods, one table.
#
# In a network namespace of its own (the "node": 169.254.169.254 and 169.254.169.252 on
# its lo) it starts the fake GCE metadata server and metaconceal-proxy, adds two pods
# with cnitool through the bridge + host-local + metaconceal conflist from conf/, and
# asks the same four metadata questions, plus DNS, NTP and the ALTS port that GCE also
# serves on the metadata address, from each pod and from the node itself (what a
# hostNetwork pod sees). Everything is torn down on exit, Ctrl-C or failure. Nothing
# here touches the machine's own netns, routes or iptables, and no packet to a
# link-local address leaves the namespaces the demo created.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${METACONCEAL_BIN:-$ROOT/bin}

if [ "$(id -u)" != 0 ]; then
	echo "demo: needs root (network namespaces, iptables inside them)" >&2
	exit 1
fi
for b in metaconceal metaconceal-proxy fake-gce-metadata bridge host-local loopback cnitool; do
	if [ ! -x "$BIN/$b" ]; then
		echo "demo: $BIN/$b is missing: run 'make build' first" >&2
		exit 1
	fi
done
for c in ip iptables curl go; do
	command -v "$c" >/dev/null || { echo "demo: $c not found on PATH" >&2; exit 1; }
done

SUFFIX=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
NODE=mcdemo-$SUFFIX
NET=metaconceal-demo-$SUFFIX
PODS=(web-1 web-2)
WORK=$(mktemp -d /tmp/metaconceal-demo.XXXXXX)
PIDS=()
ADDED=()
CREATED_NS=()

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null
	done
	for pod in "${ADDED[@]}"; do
		ip netns exec "$NODE" env CNI_PATH="$BIN" NETCONFPATH="$WORK/net.d" \
			CNI_ARGS="$(cni_args "$pod")" "$BIN/cnitool" del "$NET" "/var/run/netns/$NODE-$pod" \
			>/dev/null 2>"$WORK/cnitool-del-$pod.err" ||
			echo "demo: cnitool del $pod failed: $(cat "$WORK/cnitool-del-$pod.err")" >&2
	done
	for ns in "${CREATED_NS[@]}"; do
		ip netns delete "$ns" 2>/dev/null
	done
	# libcni's result cache for this network (cnitool keeps it in /var/lib/cni).
	rm -f /var/lib/cni/results/"$NET"-* 2>/dev/null
	rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
	rm -rf "$WORK"
	if [ "$rc" != 0 ]; then
		echo "demo: stopped (exit $rc); everything it created was removed" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cni_args() {
	echo "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$1;K8S_POD_UID=demo-$SUFFIX-$1"
}

# curl_meta NETNS PATH: "<status> <first line of the body>" for a metadata request,
# or "ERR <curl's reason>" when the request did not complete.
curl_meta() {
	local ns=$1 path=$2 body err code
	body=$WORK/body.$$
	err=$WORK/err.$$
	if code=$(ip netns exec "$ns" curl -sS -m 5 -o "$body" -w '%{http_code}' \
		-H 'Metadata-Flavor: Google' "http://169.254.169.254/computeMetadata/v1/$path" 2>"$err"); then
		printf '%s %s' "$code" "$(head -c 200 "$body" | tr -d '\r' | head -n1)"
	else
		printf 'ERR %s' "$(sed 's/^curl: ([0-9]*) //' "$err" | head -n1)"
	fi
}

cut_to() { # cut_to WIDTH TEXT: one cell of the table
	local w=$1 s=$2
	if [ "${#s}" -gt "$w" ]; then
		s="${s:0:$((w - 3))}..."
	fi
	printf '%-*s' "$w" "$s"
}

wait_http() { # wait_http NETNS URL: until something answers there (5 s at most)
	for _ in $(seq 50); do
		if ip netns exec "$1" curl -s -o /dev/null -m 1 -H 'Metadata-Flavor: Google' "$2"; then
			return 0
		fi
		sleep 0.1
	done
	echo "demo: nothing answers $2 in netns $1" >&2
	return 1
}

start_ms=$(date +%s%3N)

echo "== node netns $NODE: 169.254.169.254 (metadata) and 169.254.169.252 (proxy, scope host) on lo"
ip netns add "$NODE"
CREATED_NS+=("$NODE")
ip -n "$NODE" link set lo up
ip -n "$NODE" addr add 169.254.169.254/32 dev lo
ip -n "$NODE" addr add 169.254.169.252/32 dev lo scope host

echo "== conflist from conf/ (stateDir, logFile, subnet pointed at $WORK)"
go build -o "$WORK/democonf" ./test/demo/democonf
go build -o "$WORK/gceprobe" ./test/demo/gceprobe
mkdir -p "$WORK/net.d" "$WORK/state"
"$WORK/democonf" -conf-root "${METACONCEAL_DEMO_CONF_DIR:-conf}" -name "$NET" -bridge mcdemo0 -subnet 10.88.0.0/24 \
	-ipam-dir "$WORK/ipam" -state-dir "$WORK/state" -log-file "$WORK/metaconceal.log" \
	>"$WORK/net.d/10-demo.conflist" 2>"$WORK/democonf.err" || { cat "$WORK/democonf.err" >&2; exit 1; }
sed 's/^democonf: using /   from /' "$WORK/democonf.err"

echo "== fake GCE metadata server on 169.254.169.254 (HTTP 80, DNS 53, NTP 123, ALTS 8080),"
echo "   metaconceal-proxy on 169.254.169.252 (HTTP 988, ALTS relay 987)"
ip netns exec "$NODE" "$BIN/fake-gce-metadata" --listen 169.254.169.254:80 \
	>"$WORK/fake-gce.log" 2>&1 &
PIDS+=($!)
ip netns exec "$NODE" "$BIN/metaconceal-proxy" --listen 169.254.169.252:988 \
	--upstream http://169.254.169.254 --metrics-listen 127.0.0.1:9988 --log-format text \
	--state-dir "$WORK/state" >"$WORK/proxy.out" 2>"$WORK/proxy.log" &
PIDS+=($!)
wait_http "$NODE" http://169.254.169.254/computeMetadata/v1/
wait_http "$NODE" http://169.254.169.252:988/computeMetadata/v1/

for pod in "${PODS[@]}"; do
	echo "== pod default/$pod: cnitool add (bridge + host-local + metaconceal)"
	ip netns add "$NODE-$pod"
	CREATED_NS+=("$NODE-$pod")
	ip -n "$NODE-$pod" link set lo up
	ADDED+=("$pod")
	ip netns exec "$NODE" env CNI_PATH="$BIN" NETCONFPATH="$WORK/net.d" CNI_ARGS="$(cni_args "$pod")" \
		"$BIN/cnitool" add "$NET" "/var/run/netns/$NODE-$pod" >"$WORK/cnitool-add-$pod.json" 2>"$WORK/cnitool-add-$pod.err" ||
		{ cat "$WORK/cnitool-add-$pod.err" >&2; exit 1; }
	echo "   pod IP $(grep -o '"address": *"[^"]*"' "$WORK/cnitool-add-$pod.json" | head -n1 | sed 's/.*: *"//; s/"$//')"
done

ENDPOINTS=(
	"project/project-id"
	"instance/service-accounts/default/token"
	"instance/attributes/kube-env"
	"instance/service-accounts/default/identity?audience=https://example.com"
)
LABELS=(project-id "service-account token" kube-env "identity token")

echo
W=44
printf '%-22s | %-*s | %-*s\n' "GET computeMetadata/v1" $W "pod default/${PODS[0]}" $W "node (hostNetwork)"
printf '%s\n' "$(printf '%.0s-' $(seq $((22 + 2 * W + 6))))"
CONCEALED="403 This metadata endpoint is concealed."
FAILURES=()
# expect WHO LABEL ANSWER WANT: WANT is a status ("200") or a whole answer line.
expect() {
	local got=$3 shown=$3
	[ "${#4}" -le 3 ] && got=${3%% *}
	[ "${#shown}" -le 60 ] || shown="${shown:0:57}..."
	[ "$got" = "$4" ] || FAILURES+=("$1 $2: want '$4', got '$shown'")
}
same=0
for i in "${!ENDPOINTS[@]}"; do
	pod_answer=$(curl_meta "$NODE-${PODS[0]}" "${ENDPOINTS[$i]}")
	other_answer=$(curl_meta "$NODE-${PODS[1]}" "${ENDPOINTS[$i]}")
	node_answer=$(curl_meta "$NODE" "${ENDPOINTS[$i]}")
	# The pods get project-id and the token, never kube-env or the identity token; the
	# node (what a hostNetwork pod sees) gets kube-env.
	case ${LABELS[$i]} in
	project-id | "service-account token") want=200 ;;
	*) want=$CONCEALED ;;
	esac
	expect "pod default/${PODS[0]}" "${LABELS[$i]}" "$pod_answer" "$want"
	expect "pod default/${PODS[1]}" "${LABELS[$i]}" "$other_answer" "$want"
	[ "${LABELS[$i]}" = kube-env ] && expect node kube-env "$node_answer" 200
	# Tokens differ per request only in the fake's expiry countdown; compare the status.
	[ "${pod_answer%% *}" = "${other_answer%% *}" ] && same=$((same + 1))
	printf '%s | %s | %s\n' "$(cut_to 22 "${LABELS[$i]}")" "$(cut_to $W "$pod_answer")" "$(cut_to $W "$node_answer")"
done
# GCE's other services on the metadata address keep working for the pods: DNS (the VPC
# resolver), NTP, and the ALTS handshaker on 8080 (relayed by the proxy for the pods).
gce_probe() { # gce_probe NETNS ARGS...: the probe's one-line answer
	ip netns exec "$1" "$WORK/gceprobe" "${@:2}" 2>&1 | head -n1 || true
}
# The ALTS probe is the gRPC call over h2c that grpc-go's handshaker client makes; the
# relay carries that and nothing else, so a plain HTTP/1.1 GET on 8080 gets no answer
# from a pod (the node, which is not relayed, gets the stand-in's other marker).
GCE_LABELS=("DNS via .254 (UDP)" "DNS via .254 (TCP)" "NTP" "ALTS port 8080" "8080, HTTP/1.1 GET /")
GCE_PROBES=("dns-udp metadata.google.internal" "dns-tcp metadata.google.internal" "ntp" "alts" "alts-other")
GCE_WANT=("metadata.google.internal A 169.254.169.254" "metadata.google.internal A 169.254.169.254" "stratum 1, ref GOOG" "MCFAKEALTS handshaker ready" "MCFAKEALTS other path served")
GCE_POD_WANT=("${GCE_WANT[@]:0:4}" "ERR")
for i in "${!GCE_PROBES[@]}"; do
	# shellcheck disable=SC2086 # the probe's arguments are split on purpose
	pod_answer=$(gce_probe "$NODE-${PODS[0]}" ${GCE_PROBES[$i]})
	# shellcheck disable=SC2086
	node_answer=$(gce_probe "$NODE" ${GCE_PROBES[$i]})
	expect "pod default/${PODS[0]}" "${GCE_LABELS[$i]}" "$pod_answer" "${GCE_POD_WANT[$i]}"
	expect node "${GCE_LABELS[$i]}" "$node_answer" "${GCE_WANT[$i]}"
	label=${GCE_LABELS[$i]}
	[ "$label" = "ALTS port 8080" ] && pod_answer="$pod_answer (relayed)"
	[ "$label" = "8080, HTTP/1.1 GET /" ] && [ "${pod_answer%% *}" = ERR ] && pod_answer="no answer (relay: ALTS only)"
	printf '%s | %s | %s\n' "$(cut_to 22 "$label")" "$(cut_to $W "$pod_answer")" "$(cut_to $W "$node_answer")"
done
relayed=$(ip netns exec "$NODE" curl -s -m 5 http://127.0.0.1:9988/metrics |
	sed -n 's/^metaconceal_proxy_alts_connections_total{namespace="default"} //p')
echo
echo "The proxy's ALTS relay counted ${relayed:-0} connection(s) from namespace default (the pod's 8080)."
[ "${relayed:-0}" != 0 ] || FAILURES+=("ALTS relay: no connection counted for namespace default")
echo
echo "pod default/${PODS[1]}: same status as ${PODS[0]} for $same of ${#ENDPOINTS[@]} endpoints"
echo
echo "The proxy's audit log names the pod behind each concealed request:"
field() { grep -o " $1=[^ ]*" <<<"$2" | head -n1 | cut -d= -f2- | tr -d '"'; }
audited=0
while IFS= read -r line; do
	printf '  %-16s %-8s %-9s %s\n' "$(field pod_namespace "$line")/$(field pod_name "$line")" \
		"$(field verdict "$line")" "$(field rule "$line")" "$(field path "$line")"
	audited=$((audited + 1))
done < <(grep 'verdict=' "$WORK/proxy.log" | head -n 4)
[ "$audited" -gt 0 ] || echo "  (no audit line in the proxy's log: $WORK/proxy.log)"
echo
elapsed_ms=$(($(date +%s%3N) - start_ms))
printf 'demo: done in %d.%01d s; tearing down\n' $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
if [ "${#FAILURES[@]}" -gt 0 ]; then
	for f in "${FAILURES[@]}"; do
		echo "demo: FAILED: $f" >&2
	done
	exit 1
fi
