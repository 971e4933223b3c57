# Vigil: every set-up step lives here or in infra/scripts, idempotent and quiet
# when already done. `make run` and `make test` are the two commands a new
# machine needs.
SHELL := /bin/bash
GO ?= go
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(PATH)
PROTOC_GEN_GO_VERSION := v1.36.12
STATICCHECK_VERSION := v0.8.2
# Packages whose tests exercise concurrency; run under -race in `make test`.
RACE_PKGS := ./internal/... ./ingest/... ./stream/... ./sinks/... ./features/... ./detectors/... ./simulator/... ./cmd/...

.PHONY: all deps onnxruntime tools generate build run test test-unit test-race validate-sepsis bench fuzz lint vet fmt clean

all: build

## deps: Debian packages Vigil runs against (clickhouse-server, clickhouse-client, kcat) and the ONNX Runtime
## library from npm (onnxruntime-node, pinned) into .cache/onnxruntime.
deps: onnxruntime
	@infra/scripts/install-deps.sh runtime

## onnxruntime: libonnxruntime.so.1 from npm onnxruntime-node into .cache/onnxruntime/current (idempotent).
onnxruntime:
	@infra/scripts/install-onnxruntime.sh

$(TOOLS)/protoc-gen-go:
	@GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/staticcheck:
	@GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

tools: $(TOOLS)/protoc-gen-go $(TOOLS)/staticcheck

## generate: regenerate protobuf Go code from proto/ (installs protoc and protoc-gen-go).
generate: $(TOOLS)/protoc-gen-go
	@infra/scripts/install-deps.sh generate
	cd proto && protoc -I . --go_out=. --go_opt=paths=source_relative vigil/v1/*.proto
	protoc -I proto --go_out=. --go_opt=module=github.com/vigilhealth/vigil --go_opt=Monnx/onnx-ml.proto=github.com/vigilhealth/vigil/detectors/model/onnxpb onnx/onnx-ml.proto

## build: the vigil binary in bin/.
build:
	$(GO) build -o bin/vigil ./cmd/vigil

## run: install what is missing, then run the whole platform with the simulator.
run: deps build
	./bin/vigil run --simulate

## test: the whole suite, unit and integration, against real ClickHouse and a kfake broker over TCP.
test: deps lint test-unit test-race

test-unit:
	$(GO) test -count=1 -timeout 15m ./...

test-race:
	$(GO) test -count=1 -race -timeout 15m -short $(RACE_PKGS)

## validate-sepsis: `vigil validate sepsis2019` on all of PhysioNet/CinC 2019 set B: trains the sepsis model on 70% of
## the patients, replays every row through the pipeline, prints AUROC and utility per score; fails when the model
## does not beat NEWS2 on the held-out 30%. SEPSIS_OUT is the output folder (CSV, model registry).
SEPSIS_DATA ?= ../shared/datasets/sepsis2019-setB/training_setB.tar.gz
SEPSIS_OUT ?= .vigil/validate-sepsis
validate-sepsis: onnxruntime build
	./bin/vigil validate sepsis2019 --data $(SEPSIS_DATA) --out $(SEPSIS_OUT)/sepsis2019.csv --registry $(SEPSIS_OUT)/models --log-level warn

## bench: every benchmark (whole-process where the issue asks for it), one package at a time so they do not
## share the cores; BENCH=<regex> picks benchmarks, PKG=<packages> limits the packages, BENCHTIME the time each runs.
BENCH ?= .
BENCHTIME ?= 2s
PKG ?= ./...
bench: deps
	$(GO) test -p 1 -count 1 -run '^$$' -bench '$(BENCH)' -benchtime $(BENCHTIME) -benchmem -timeout 14m $(PKG)

## fuzz: every Go fuzz target of the repo (found by grep, so new ones are included), each for FUZZTIME;
## FUZZ=<regex> picks targets by name, PKG=<packages> limits the packages. Stops at the first failure.
FUZZ ?= .
FUZZTIME ?= 30s
fuzz:
	@set -eo pipefail; n=0; \
	for pkg in $$($(GO) list -e -f '{{.ImportPath}}={{.Dir}}' $(PKG)); do \
	  dir=$${pkg#*=}; pkg=$${pkg%%=*}; \
	  for f in $$(cat $$dir/*_test.go 2>/dev/null | grep -o '^func Fuzz[A-Za-z0-9_]*' | cut -c6- | sort -u); do \
	    [[ $$f =~ $(FUZZ) ]] || continue; \
	    echo "== $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$pkg; n=$$((n+1)); \
	  done; \
	done; \
	echo "fuzz: $$n targets ran for $(FUZZTIME) each without a failure"

vet:
	$(GO) vet ./...

## lint: gofmt, go vet and staticcheck.
lint: $(TOOLS)/staticcheck vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); exit 1)
	staticcheck ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin .tools
