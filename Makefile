# ferry — see README.md. Every target runs as root on a Debian machine.
SHELL   := bash
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BIN     := bin/ferry
# Whole test run; CPU-heavy parts are bounded so it fits a 2-core CI.
TESTFLAGS ?= -race -timeout 40m

.PHONY: build test lint fmt deps demo bench bench-quick fuzz clean

build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/ferry

deps:
	./scripts/deps.sh

# The JSON stream goes to internal/cmd/testsummary, which prints a per-package
# summary and fails on a failure or on a skip scripts/skip-allow.txt does not
# list. FERRY_REQUIRE=all (set by .ci/run; CI=true does the same) turns every
# environment skip into a failure naming what is missing.
test: deps lint
	@mkdir -p bin
	set -o pipefail; $(GO) test -json $(TESTFLAGS) ./... | $(GO) run ./internal/cmd/testsummary -allow scripts/skip-allow.txt -o bin/test.json

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

bench: deps build
	$(GO) test -run '^$$' -bench Suite -benchtime 1x -timeout 90m -v ./integration/bench

# The data-path rows only (export vs tgtd, dense hydration vs cp and tgt), at
# reduced sizes: a few minutes, for before and after a data-path change.
bench-quick: deps build
	FERRY_BENCH_QUICK=1 $(GO) test -run '^$$' -bench 'Suite/(export|hydration)$$' -benchtime 1x -timeout 20m -v ./integration/bench

clean:
	rm -rf bin
