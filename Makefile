# metaconceal: build, test, e2e, bench, demo, install.
# Every target that needs the network builds a simulated node in a netns of its own;
# nothing here touches the machine's own netns, routes or iptables.

GO        ?= go
BIN       := $(CURDIR)/bin
GOFLAGS_BUILD := -trimpath -ldflags=-s
export CGO_ENABLED := 0

# As root (CI is root), a privileged test that would skip fails instead.
REQUIRE_PRIVILEGED := $(shell [ "$$(id -u)" = 0 ] && echo 1)
export METACONCEAL_REQUIRE_PRIVILEGED := $(REQUIRE_PRIVILEGED)
export METACONCEAL_BIN := $(BIN)

PROGRAMS := metaconceal:./plugins/metaconceal \
            metaconceal-proxy:./cmd/metaconceal-proxy \
            metaconceal-install:./cmd/metaconceal-install \
            fake-gce-metadata:./test/fakegce/cmd/fake-gce-metadata
# CNI test binaries, pinned by the go.mod tool directives.
TOOLS := github.com/containernetworking/plugins/plugins/main/bridge \
         github.com/containernetworking/plugins/plugins/ipam/host-local \
         github.com/containernetworking/plugins/plugins/main/loopback \
         github.com/containernetworking/plugins/plugins/meta/portmap \
         github.com/containernetworking/cni/cnitool \
         sigs.k8s.io/cri-tools/cmd/crictl

.PHONY: all build programs tools deps deps-runtime test unit fuzz fuzz-all e2e demo bench-cni bench-proxy kind-e2e install image clean

all: build

build: programs tools

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
test: deps-runtime build unit fuzz e2e

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

e2e: deps-runtime build
	$(GO) test -count=1 -timeout 8m -tags e2e -v ./test/e2e/...

demo: deps build
	bash test/demo/demo.sh

bench-cni: deps build
	$(GO) run ./test/bench/cni

bench-proxy: deps build
	$(GO) run ./test/bench/proxy

kind-e2e:
	bash test/kind/kind-e2e.sh

image:
	docker build -t metaconceal:dev -f conf/Dockerfile .

clean:
	rm -rf $(BIN)
