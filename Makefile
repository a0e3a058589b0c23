# ferry — see README.md. Every target runs as root on a Debian machine.
SHELL   := bash
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BIN     := bin/ferry
# Whole test run; CPU-heavy parts are bounded so it fits a 2-core CI.
TESTFLAGS ?= -race -timeout 40m

.PHONY: build test lint fmt deps demo bench bench-quick fuzz chaos clean

build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/ferry

deps:
	./scripts/deps.sh

# The JSON stream goes to internal/cmd/testsummary, which prints a per-package
# summary and fails on a failure or on a skip scripts/skip-allow.txt does not
# list. FERRY_REQUIRE=all (set by .ci/run; CI=true does the same) turns every
# environment skip into a failure naming what is missing.
#
# The packages that run whole clusters (servers, agents, machines, a VM) run
# one at a time, beside the other packages (also one at a time): with every
# package free to overlap, two or three clusters shared the 2 cores, raft
# lost its leader and healthy agents' leases lapsed, and each CI run failed
# a different chaos row (load average 17 to 33).
CLUSTER_PKGS := ./integration/chaos ./integration/e2e ./integration/vm
test: deps lint
	@mkdir -p bin
	set -o pipefail; \
	( $(GO) test -json -p 1 $(TESTFLAGS) $(CLUSTER_PKGS) | $(GO) run ./internal/cmd/testsummary -allow scripts/skip-allow.txt -o bin/test-clusters.json ) & clusters=$$!; \
	$(GO) test -json -p 1 $(TESTFLAGS) $$($(GO) list ./... | grep -v -E '/integration/(chaos|e2e|vm)$$') | $(GO) run ./internal/cmd/testsummary -allow scripts/skip-allow.txt -o bin/test.json; rest=$$?; \
	wait $$clusters; cl=$$?; echo "cluster packages: exit $$cl; the others: exit $$rest"; exit $$(( rest | cl ))

# staticcheck at a pinned version: a new release's new checks land on purpose.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

lint:
	@out="$$(gofmt -l . )"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

fmt:
	gofmt -w .

demo: deps build
	./$(BIN) demo

# Every fuzz target for FUZZTIME each; new crashers stay in testdata/fuzz.
FUZZTIME ?= 30s
fuzz:
	FUZZTIME=$(FUZZTIME) GO=$(GO) ./scripts/fuzz.sh

# The whole chaos matrix: every participant (agents, raft leader, follower)
# killed at every state, every network split both ways and each way, every
# link outage, the long soak. `make test` runs its short form.
chaos: deps
	FERRY_CHAOS=full $(GO) test -count=1 -timeout 150m -v ./integration/chaos

bench: deps build
	FERRY_BENCH_EXE=$(CURDIR)/$(BIN) $(GO) test -run '^$$' -bench Suite -benchtime 1x -timeout 90m -v ./integration/bench

# The data-path rows only (export vs tgtd, dense hydration vs cp and tgt, a
# sparse volume's fetched bytes), at reduced sizes: under 3 minutes, for
# before and after a data-path change. Prints the rows it measured at the end.
bench-quick: deps build
	FERRY_BENCH_QUICK=1 FERRY_BENCH_EXE=$(CURDIR)/$(BIN) $(GO) test -run '^$$' -bench 'Suite/(export|hydration|sparse)$$' -benchtime 1x -timeout 10m -v ./integration/bench

clean:
	rm -rf bin
