# metaconceal: build, test, e2e, bench, demo, install.
# Every target that needs the network builds a simulated node in a netns of its own;
# nothing here touches the machine's own netns, routes or iptables.

GO        ?= go
BIN       := $(CURDIR)/bin
# Every program reports its build (--version, metaconceal_build_info): internal/buildinfo.
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
BUILDINFO := github.com/metaconceal/metaconceal/internal/buildinfo
GOFLAGS_BUILD := -trimpath -ldflags='-s -X $(BUILDINFO).version=$(VERSION) -X $(BUILDINFO).commit=$(COMMIT)'
export CGO_ENABLED := 0

# As root (CI is root), a privileged test that would skip fails instead.
REQUIRE_PRIVILEGED := $(shell [ "$$(id -u)" = 0 ] && echo 1)
export METACONCEAL_REQUIRE_PRIVILEGED := $(REQUIRE_PRIVILEGED)
export METACONCEAL_BIN := $(BIN)

PROGRAMS := metaconceal:./plugins/metaconceal \
            metaconceal-proxy:./cmd/metaconceal-proxy \
            metaconceal-install:./cmd/metaconceal-install \
            fake-gce-metadata:./test/cmd/fake-gce-metadata
# CNI test binaries, pinned by the go.mod tool directives.
TOOLS := github.com/containernetworking/plugins/plugins/main/bridge \
         github.com/containernetworking/plugins/plugins/ipam/host-local \
         github.com/containernetworking/plugins/plugins/main/loopback \
         github.com/containernetworking/plugins/plugins/main/ptp \
         github.com/containernetworking/plugins/plugins/meta/portmap \
         github.com/containernetworking/cni/cnitool \
         sigs.k8s.io/cri-tools/cmd/crictl

.PHONY: all build programs tools deps deps-runtime test unit fuzz fuzz-all e2e demo bench-cni bench-proxy kind-e2e install image clean \
	helm promtool manifests chart-test

all: build

build: programs tools helm promtool

# Heavy tools from pinned modules in separate tools modules (the product's go.mod stays
# small), built once into bin/tools: helm (tools/helm: the chart's lint, template and
# golden tests, make manifests, the cluster e2e's Helm pass, the release's packaging)
# and promtool (tools/promtool: the alerts' rule tests).
TOOLS_BIN := $(BIN)/tools
HELM      := $(TOOLS_BIN)/helm
PROMTOOL  := $(TOOLS_BIN)/promtool

helm: $(HELM)
$(HELM): tools/helm/go.mod tools/helm/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/helm && $(GO) build -trimpath -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$$(awk '$$1 == "helm.sh/helm/v4" {print $$2}' go.mod)" -o $(HELM) helm.sh/helm/v4/cmd/helm

promtool: $(PROMTOOL)
$(PROMTOOL): tools/promtool/go.mod tools/promtool/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/promtool && $(GO) build -trimpath -ldflags='-s -w' -o $(PROMTOOL) github.com/prometheus/prometheus/cmd/promtool

# conf/deploy (the kustomize base) is rendered from charts/metaconceal; the unit tests
# fail when it is stale (conf/deploy/rendered_test.go).
manifests: helm
	$(GO) test -count=1 -run '^TestRenderedFromChart$$' ./conf/deploy -update

# The chart and its alerts (also part of `make unit`): helm lint, the golden renders,
# the schema's refusals, promtool check/test rules, the metric names against the
# programs' real /metrics. `make chart-test UPDATE=1` rewrites the golden files.
chart-test: helm promtool
	$(GO) test -count=1 ./charts/ ./conf/deploy/ $(if $(UPDATE),-update)

programs:
	@mkdir -p $(BIN)
	@for p in $(PROGRAMS); do \
		name=$${p%%:*}; pkg=$${p#*:}; \
		echo "go build -o bin/$$name $$pkg"; \
		$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/$$name $$pkg || exit 1; \
	done

tools:
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/ $(TOOLS)

deps:
	bash test/install-deps.sh

deps-runtime:
	bash test/install-deps.sh --runtime

# The README's test command: static checks, unit and privileged integration tests
# (iptables nf_tables and legacy, cnitool on a simulated node), a short fuzz run of
# every fuzz target, then the real-runtime e2e.
# Each step prints its time (`phase <step> <seconds>s`), as the cluster e2e does.
TEST_STEPS := deps-runtime build unit fuzz e2e
test:
	@for step in $(TEST_STEPS); do \
		start=$$(date +%s); \
		$(MAKE) --no-print-directory $$step || exit 1; \
		echo "phase $$step $$(( $$(date +%s) - start ))s"; \
	done

unit:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	@# go test prints no SKIP line without -v: a skip must go through
	@# testutil.RequirePrivileged, which fails instead as root.
	@skips=$$(grep -rnE '\.Skip(f|Now)?\(' --include='*_test.go' . | grep -v '^./internal/testutil/' || true); \
	if [ -n "$$skips" ]; then echo "t.Skip outside internal/testutil (use testutil.RequirePrivileged):"; echo "$$skips"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e/...
	$(GO) test -count=1 -timeout 5m ./...

# The README's test command fuzzes the policy's leak property; `make fuzz-all` runs
# every target (the unit tests already replay every committed corpus).
fuzz:
	FUZZTIME=$${FUZZTIME:-10s} FUZZ_TARGETS='^FuzzProxyNeverLeaksConcealed$$' bash test/fuzz-smoke.sh

fuzz-all:
	FUZZTIME=$${FUZZTIME:-10s} bash test/fuzz-smoke.sh

# test/e2e/nodeagent runs a real kube-apiserver + etcd: the binaries of cluster-tools.
e2e: deps-runtime build cluster-tools
	$(GO) test -count=1 -timeout 8m -tags e2e -v ./test/e2e/...

demo: deps build
	bash test/demo/demo.sh

bench-cni: deps build
	$(GO) run ./test/bench/cni

bench-proxy: deps build
	$(GO) run ./test/bench/proxy
	# Attested identity: record to rule, and one connection with 110 attachments (root).
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkRecordToRule|BenchmarkConnection' -benchtime 300x ./test/bypass/

# Cluster e2e (test/cluster, docs/cluster-e2e.md): a real one-node Kubernetes cluster
# on this machine, conf/deploy applied with kubectl (CLUSTER_INSTALL=helm: the chart
# installed with bin/tools/helm), the scenarios of
# test/cluster/scenario. Kubernetes and etcd come from pinned modules in the separate
# tools module test/cluster/tools (the product's go.mod stays small).
CLUSTER_BIN := $(BIN)/cluster
K8S_VERSION := v1.37.2
K8S_LDFLAGS := -s -w \
	-X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
	-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 \
	-X k8s.io/component-base/version.gitTreeState=clean \
	-X k8s.io/client-go/pkg/version.gitVersion=$(K8S_VERSION) \
	-X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=37
K8S_PROGRAMS := k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl \
	k8s.io/kubernetes/cmd/kube-proxy

.PHONY: cluster-e2e cluster-tools cluster-image-tools

# The runner, the image writer (go-containerregistry), the probe and pause programs.
cluster-image-tools:
	@mkdir -p $(CLUSTER_BIN)
	cd test/cluster/tools && $(GO) build -trimpath -ldflags=-s -o $(CLUSTER_BIN)/ociarchive ./ociarchive
	$(GO) build $(GOFLAGS_BUILD) -o $(CLUSTER_BIN)/cluster-e2e ./test/cluster/cmd/cluster-e2e
	$(GO) build $(GOFLAGS_BUILD) -o $(CLUSTER_BIN)/probe ./test/cluster/probe
	$(GO) build $(GOFLAGS_BUILD) -o $(CLUSTER_BIN)/pause ./test/e2e/pause

# etcd and Kubernetes: about 8 minutes cold on 2 cores, seconds warm.
cluster-tools: cluster-image-tools
	cd test/cluster/tools && $(GO) build -trimpath -ldflags='-s -w' -o $(CLUSTER_BIN)/etcd go.etcd.io/etcd/server/v3
	cd test/cluster/tools && $(GO) build -trimpath -ldflags='$(K8S_LDFLAGS)' -o $(CLUSTER_BIN)/ $(K8S_PROGRAMS)

cluster-e2e: deps-runtime
	@start=$$(date +%s); $(MAKE) --no-print-directory programs tools helm cluster-tools || exit 1; \
	echo "phase build $$(( $$(date +%s) - start ))s"
	$(CLUSTER_BIN)/cluster-e2e --provider=local $(if $(SCENARIOS),--scenarios=$(SCENARIOS))

# The same scenarios on a kind cluster (Docker hosts only; not run in CI).
kind-e2e: programs tools cluster-image-tools
	$(CLUSTER_BIN)/cluster-e2e --provider=kind $(if $(SCENARIOS),--scenarios=$(SCENARIOS))

# ==== Release (docs/release.md) =======================================================
# make release VERSION=x.y.z [SIGNING_KEY=cosign.key]  (COSIGN_PASSWORD from the env)
# make verify-release [PUBLIC_KEY=cosign.pub] [RELEASE_DIST=dist]
# make test-release: a release with a throwaway key, verified, then tampered with.
# cosign and the release writer (mcrelease) come from the separate tools module
# tools/release (cosign pinned there); go-containerregistry builds the image, no Docker.
RELEASE_DIST    ?= $(CURDIR)/dist
RELEASE_WORK    := $(BIN)/release-work
RELEASE_DEBS    := $(BIN)/cluster/debs
RELEASE_ARCHES  := amd64 arm64
RELEASE_PROGRAMS := metaconceal:./plugins/metaconceal \
                    metaconceal-proxy:./cmd/metaconceal-proxy \
                    metaconceal-install:./cmd/metaconceal-install
SIGNING_KEY     ?= cosign.key
PUBLIC_KEY      ?= cosign.pub
COSIGN          := $(BIN)/tools/cosign
MCRELEASE       := $(BIN)/tools/mcrelease
# Integration point with the chart (charts/metaconceal, `make helm` -> bin/tools/helm):
# when the chart directory exists, the release packages and signs it; until it is
# merged, the release has no chart and says so.
CHART_DIR       := charts/metaconceal
HELM            ?= $(BIN)/tools/helm
RELEASE_SEMVER  := ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$$

.PHONY: release verify-release test-release release-tools

# cosign: a heavy build, once (measured 2650 s cold at load average 20-28 on the 2 shared
# cores; docs/release.md); rebuilt only when the pin (tools/release/go.sum) moves.
$(COSIGN): tools/release/go.mod tools/release/go.sum
	@mkdir -p $(BIN)/tools
	cd tools/release && $(GO) build -trimpath -ldflags='-s -w' -o $(COSIGN) github.com/sigstore/cosign/v3/cmd/cosign

release-tools: $(COSIGN)
	cd tools/release && $(GO) build -trimpath -o $(MCRELEASE) ./cmd/mcrelease

release: release-tools
	@if [ "$(origin VERSION)" != "command line" ] && [ "$(origin VERSION)" != "environment" ]; then \
		echo "release: say the version: make release VERSION=x.y.z"; exit 1; fi
	@echo "$(VERSION)" | grep -Eq '$(RELEASE_SEMVER)' || { echo "release: VERSION=$(VERSION) is not x.y.z[-pre]"; exit 1; }
	@test -f "$(SIGNING_KEY)" || { echo "release: SIGNING_KEY=$(SIGNING_KEY) not found (cosign generate-key-pair; docs/release.md)"; exit 1; }
	@if [ -n "$$(git status --porcelain)" ] && [ "$(ALLOW_DIRTY)" != 1 ]; then \
		echo "release: the work tree has changes; commit them (or ALLOW_DIRTY=1, recorded as dirty in the provenance)"; exit 1; fi
	@test ! -e "$(RELEASE_DIST)" || { echo "release: $(RELEASE_DIST) exists; remove it first"; exit 1; }
	@# Debian's packages of each architecture: a foreign one is added to dpkg once.
	@for arch in $(RELEASE_ARCHES); do \
		if [ "$$arch" != "$$(dpkg --print-architecture)" ] && ! dpkg --print-foreign-architectures | grep -qx "$$arch"; then \
			echo "dpkg --add-architecture $$arch && apt-get update"; \
			dpkg --add-architecture $$arch && apt-get update -qq || exit 1; \
		fi; \
	done
	rm -rf $(RELEASE_WORK)
	@for arch in $(RELEASE_ARCHES); do \
		for p in $(RELEASE_PROGRAMS); do \
			name=$${p%%:*}; pkg=$${p#*:}; \
			echo "GOOS=linux GOARCH=$$arch go build -o $(RELEASE_WORK)/$$arch/bin/$$name $$pkg"; \
			GOOS=linux GOARCH=$$arch $(GO) build $(GOFLAGS_BUILD) -o $(RELEASE_WORK)/$$arch/bin/$$name $$pkg || exit 1; \
		done; \
		$(GO) run ./test/cluster/cmd/product-rootfs --arch $$arch --root $(RELEASE_WORK)/$$arch/rootfs \
			--packages $(RELEASE_WORK)/$$arch/packages.json --deb-cache $(RELEASE_DEBS) || exit 1; \
	done
	@chart=; \
	if [ -d "$(CHART_DIR)" ]; then \
		[ -x "$(HELM)" ] || $(MAKE) --no-print-directory helm || exit 1; \
		$(HELM) package $(CHART_DIR) --version $(VERSION) --app-version $(VERSION) -d $(RELEASE_WORK)/chart || exit 1; \
		chart=$$(ls $(RELEASE_WORK)/chart/*.tgz); \
	else \
		echo "release: no $(CHART_DIR) in this tree: the release has no chart"; \
	fi; \
	state=clean; [ -z "$$(git status --porcelain)" ] || state=dirty; \
	$(MCRELEASE) build --version $(VERSION) --commit $(COMMIT) --tree-state $$state \
		--command "make release VERSION=$(VERSION)" \
		--source-date-epoch $$(git log -1 --format=%ct) --distro debian-$$(. /etc/os-release && echo $$VERSION_ID) \
		--work $(RELEASE_WORK) --chart "$$chart" --out $(RELEASE_DIST)
	$(MCRELEASE) sign --dist $(RELEASE_DIST) --key $(SIGNING_KEY) --cosign $(COSIGN)
	@echo "release $(VERSION) in $(RELEASE_DIST) (make verify-release PUBLIC_KEY=... checks it)"

verify-release: release-tools
	$(MCRELEASE) verify --dist $(RELEASE_DIST) --key $(PUBLIC_KEY) --cosign $(COSIGN)

# Not part of `make test` (cross builds, two Debian roots, cosign): .ci/run runs it and
# prints its time.
test-release: release-tools
	bash tools/release/test-release.sh
# ==== end of release ==================================================================

image:
	docker build --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) -t metaconceal:dev -f conf/Dockerfile .

clean:
	rm -rf $(BIN)
