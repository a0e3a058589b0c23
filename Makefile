# ferry — see README.md. Every target runs as root on a Debian/Ubuntu machine.
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

test: deps lint
	$(GO) test $(TESTFLAGS) ./...

lint:
	@out="$$(gofmt -l . )"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fmt:
	gofmt -w .

demo: deps build
	./$(BIN) demo

bench: deps build
	$(GO) test -run '^$$' -bench Suite -benchtime 1x -timeout 90m -v ./integration/bench

# The data-path rows only (export vs tgtd, dense hydration vs cp and tgt), at
# reduced sizes: a few minutes, for before and after a data-path change.
bench-quick: deps build
	FERRY_BENCH_QUICK=1 $(GO) test -run '^$$' -bench 'Suite/(export|hydration)$$' -benchtime 1x -timeout 20m -v ./integration/bench

clean:
	rm -rf bin
