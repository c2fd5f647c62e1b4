#!/usr/bin/env bash
# Builds the programs of the docker-compose stack from their Go modules, for machines without Docker:
#   otelcol  the OpenTelemetry Collector 0.139.0 (core v0.139.0 / v1.45.0, contrib v0.139.0) from
#            stack/otelcol/main.go: the components collector-config/ uses, plus tail_sampling
#   jaeger   Jaeger 2.12.0 (Go module github.com/jaegertracing/jaeger v1.75.0, cmd/jaeger)
# the same releases docker-compose.yml pins. Prometheus is not built here: Debian's prometheus package
# (apt-get install prometheus) is the one the stack runs (stack/run-stack.sh, tests/test_real_stack.py).
#
# Both come from stack/go.mod and stack/go.sum as committed (-mod=readonly: nothing is upgraded or
# resolved anew), into one directory per release pair, built once: a second run with the same go.mod,
# go.sum and main.go only prints the directory. Needs Go 1.24.6 or newer and the Go module proxy.
#
#   stack/build-stack.sh            # prints the directory holding otelcol and jaeger
#
# Where: $OTEL_BGTASKS_STACK_BIN if set, else ${XDG_CACHE_HOME:-$HOME/.cache}/otel-bgtasks-stack/<releases>.
# Go's own module and build caches (go env GOMODCACHE GOCACHE) make a rebuild after a change quick.
set -euo pipefail

OTELCOL_VERSION=0.139.0
JAEGER_VERSION=2.12.0  # Go module v1.75.0: Jaeger 2.14 and later cannot be fetched as a Go module
JAEGER_MODULE_VERSION=v1.75.0

stack=$(cd "$(dirname "$0")" && pwd)
bin=${OTEL_BGTASKS_STACK_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/otel-bgtasks-stack/otelcol-$OTELCOL_VERSION-jaeger-$JAEGER_VERSION}
inputs=$(cd "$stack" && cat go.mod go.sum otelcol/main.go | sha256sum | cut -d' ' -f1)

if [ -x "$bin/otelcol" ] && [ -x "$bin/jaeger" ] && [ "$(cat "$bin/inputs.sha256" 2>/dev/null)" = "$inputs" ]; then
    echo "$bin"
    exit 0
fi

if ! command -v go >/dev/null; then
    echo "build-stack.sh: no go command on PATH (Go 1.24.6 or newer is needed)" >&2
    exit 1
fi

cd "$stack"
export GOFLAGS="-mod=readonly ${GOFLAGS:-}"
# Never a module at another release: go.mod pins one collector release (what Jaeger v1.75.0 pins too).
# The semconv module is a pseudo-version in those pins, and the collector's pdata/... v1 modules are v1.45.0.
others=$(go list -m all | awk '$1 ~ /^(go\.opentelemetry\.io\/collector|github\.com\/open-telemetry\/opentelemetry-collector-contrib)(\/|$)/ \
    && $1 !~ /\/semconv$/ && $2 !~ /^v(0\.139\.0|1\.45\.0)$/')
if [ -n "$others" ]; then
    printf 'build-stack.sh: collector modules not at 0.139.0 / 1.45.0:\n%s\n' "$others" >&2
    exit 1
fi
jaeger=$(go list -m github.com/jaegertracing/jaeger | cut -d' ' -f2)
if [ "$jaeger" != "$JAEGER_MODULE_VERSION" ]; then
    echo "build-stack.sh: go.mod has github.com/jaegertracing/jaeger $jaeger, not $JAEGER_MODULE_VERSION" >&2
    exit 1
fi

# Into a fresh directory beside the final one, then moved into place: a build that stops half-way (or
# runs twice at once) never leaves a directory that looks complete.
mkdir -p "$(dirname "$bin")"
work=$(mktemp -d "$bin.building.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
echo "building otelcol $OTELCOL_VERSION and jaeger $JAEGER_VERSION into $bin" >&2
# -trimpath: the same binary whatever the checkout's path, and build-cache hits across checkouts.
go build -trimpath -o "$work/otelcol" ./otelcol
go build -trimpath -o "$work/jaeger" \
    -ldflags "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=v$JAEGER_VERSION" \
    github.com/jaegertracing/jaeger/cmd/jaeger
echo "$inputs" >"$work/inputs.sha256"
rm -rf "$bin"
mv "$work" "$bin"
trap - EXIT
echo "$bin"
