#!/usr/bin/env bash
# kind end-to-end test of the deployment (make kind-e2e).
#
# Needs Docker, kind and kubectl on a machine that can pull debian/golang/curl images.
# It is NOT part of CI and was not run where this project is built (no Docker there).
#
# 1. creates a kind cluster (test/kind/kind-config.yaml: control plane + one worker),
# 2. builds the image from conf/Dockerfile and loads it into the nodes,
# 3. starts the project's fake GCE metadata server on every node (hostNetwork pod on
#    169.254.169.254:80, an address it puts on the node container's lo),
# 4. applies conf/deploy (kubectl apply -k) and waits for the DaemonSet,
# 5. runs the pattern of Kubernetes' metadata-concealment e2e check: from a normal pod,
#    kube-env and the identity token are concealed and the rest answers; from a
#    hostNetwork pod, kube-env is readable,
# 6. prints PASS or FAIL and deletes the cluster (KEEP_CLUSTER=1 keeps it).
set -euo pipefail

cd "$(dirname "$0")/../.."

cluster=${KIND_CLUSTER:-metaconceal-e2e}
# conf/deploy/kustomization.yaml names metaconceal:dev; loading that tag into the
# nodes lets `kubectl apply -k conf/deploy` run unchanged.
image=metaconceal:dev
curl_image=${CURL_IMAGE:-curlimages/curl:8.11.1}
keep=${KEEP_CLUSTER:-0}
kctl=(kubectl --context "kind-$cluster")

for tool in docker kind kubectl; do
	if ! command -v "$tool" >/dev/null; then
		echo "kind-e2e: needs $tool on PATH (this test runs only where Docker is available)" >&2
		exit 2
	fi
done

created=0
# shellcheck disable=SC2317 # called from the EXIT trap
diagnose() {
	echo "---- diagnostics"
	"${kctl[@]}" get pods -A -o wide || true
	"${kctl[@]}" -n metaconceal-system logs daemonset/metaconceal --all-containers --prefix --tail=100 || true
	"${kctl[@]}" -n metaconceal-e2e logs daemonset/fake-gce-metadata --all-containers --prefix --tail=50 || true
	for node in $(kind get nodes --name "$cluster" 2>/dev/null); do
		echo "---- $node: /etc/cni/net.d"
		docker exec "$node" sh -c 'ls -l /etc/cni/net.d; cat /etc/cni/net.d/*.conflist' || true
	done
}
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
	rc=$?
	if [ "$rc" != 0 ] && [ "$created" = 1 ]; then
		diagnose
	fi
	if [ "$created" = 1 ] && [ "$keep" != 1 ]; then
		kind delete cluster --name "$cluster" || true
	fi
	if [ "$rc" = 0 ]; then echo "kind-e2e: PASS"; else echo "kind-e2e: FAIL"; fi
	exit "$rc"
}
trap cleanup EXIT

echo "==> creating kind cluster $cluster"
kind create cluster --name "$cluster" --config test/kind/kind-config.yaml --wait 180s
created=1

echo "==> building $image"
docker build -t "$image" -f conf/Dockerfile .
kind load docker-image "$image" --name "$cluster"
docker pull "$curl_image"
kind load docker-image "$curl_image" --name "$cluster"

echo "==> fake metadata server on every node"
"${kctl[@]}" apply -f test/kind/fake-metadata.yaml
"${kctl[@]}" -n metaconceal-e2e rollout status daemonset/fake-gce-metadata --timeout=180s

echo "==> kubectl apply -k conf/deploy"
"${kctl[@]}" apply -k conf/deploy
"${kctl[@]}" -n metaconceal-system rollout status daemonset/metaconceal --timeout=300s
for node in $(kind get nodes --name "$cluster"); do
	if ! docker exec "$node" sh -c 'grep -l "\"metaconceal\"" /etc/cni/net.d/*.conflist' >/dev/null; then
		echo "kind-e2e: no metaconceal entry in $node's CNI config" >&2
		exit 1
	fi
	echo "$node: entry present in $(docker exec "$node" sh -c 'grep -l "\"metaconceal\"" /etc/cni/net.d/*.conflist')"
done

# The checks run inside the pods. expect NAME CODE BODY PATH [curl args...]:
# CODE is the wanted HTTP status (000: connection refused); BODY, when not empty, must
# appear in the response, or with a leading ! must not.
# shellcheck disable=SC2016 # expanded by the pod's shell, not this one
checks_lib='
fails=0
expect() {
	name=$1 want=$2 body=$3 path=$4; shift 4
	code=$(curl -sS --path-as-is -m 10 -o /tmp/body -w "%{http_code}" -H "Metadata-Flavor: Google" "$@" "http://169.254.169.254$path" 2>/dev/null) || true
	[ -n "$code" ] || code=000
	ok=1
	[ "$code" = "$want" ] || ok=0
	case $body in
	"") ;;
	!*) ! grep -qF -- "${body#!}" /tmp/body 2>/dev/null || ok=0 ;;
	*) grep -qF -- "$body" /tmp/body 2>/dev/null || ok=0 ;;
	esac
	if [ "$ok" = 1 ]; then
		echo "PASS $name ($code)"
	else
		echo "FAIL $name: got $code \"$(head -c 120 /tmp/body 2>/dev/null | tr "\n" " ")\", want $want $body"
		fails=$((fails + 1))
	fi
}
'
concealed="This metadata endpoint is concealed."
pod_checks="$checks_lib
expect project-id 200 '' /computeMetadata/v1/project/project-id
expect sa-token 200 access_token /computeMetadata/v1/instance/service-accounts/default/token
expect discovery 200 '' /computeMetadata/v1/
expect kube-env 403 '$concealed' /computeMetadata/v1/instance/attributes/kube-env
expect kube-env-double-slash 403 '$concealed' /computeMetadata/v1/instance/attributes//kube-env
expect kube-env-dot-dot 403 '$concealed' /computeMetadata/v1/instance/attributes/../attributes/kube-env
expect identity 403 '$concealed' '/computeMetadata/v1/instance/service-accounts/default/identity?audience=e2e'
expect kube-env-v1beta1 403 '' /computeMetadata/v1beta1/instance/attributes/kube-env
expect kube-env-0.1 403 '' /0.1/meta-data/attributes/kube-env
expect unknown-version 403 '' /computeMetadata/v2/
expect recursive-attributes 403 '' '/computeMetadata/v1/instance/attributes/?recursive=true'
expect x-forwarded-for 403 '' /computeMetadata/v1/project/project-id -H 'X-Forwarded-For: 10.0.0.1'
echo \"failures: \$fails\"
exit \$fails
"
host_checks="$checks_lib
expect host-kube-env 200 '!concealed' /computeMetadata/v1/instance/attributes/kube-env
expect host-identity 200 '!concealed' '/computeMetadata/v1/instance/service-accounts/default/identity?audience=e2e'
expect host-project-id 200 '' /computeMetadata/v1/project/project-id
echo \"failures: \$fails\"
exit \$fails
"

run_checks() { # NAME OVERRIDES SCRIPT
	local name=$1 overrides=$2 script=$3 phase
	"${kctl[@]}" run "$name" --image="$curl_image" --image-pull-policy=IfNotPresent --restart=Never \
		--overrides="$overrides" --command -- sh -c "$script"
	for _ in $(seq 1 90); do
		phase=$("${kctl[@]}" get pod "$name" -o jsonpath='{.status.phase}')
		case $phase in Succeeded | Failed) break ;; esac
		sleep 2
	done
	echo "---- $name ($phase)"
	"${kctl[@]}" logs "$name"
	[ "$phase" = Succeeded ]
}

status=0
echo "==> checks from a normal pod (must be concealed)"
run_checks conceal-check '{"apiVersion":"v1","spec":{}}' "$pod_checks" || status=1
echo "==> checks from a hostNetwork pod (must not be concealed)"
run_checks hostnet-check '{"apiVersion":"v1","spec":{"hostNetwork":true}}' "$host_checks" || status=1
exit "$status"
