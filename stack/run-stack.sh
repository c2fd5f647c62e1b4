#!/usr/bin/env bash
# Runs the docker-compose stack without Docker: the OpenTelemetry Collector, Jaeger and Prometheus that
# stack/build-stack.sh built (Prometheus: Debian's, `apt-get install prometheus`), each with the
# repository's own config from collector-config/, all on 127.0.0.1. Ctrl-C stops all three.
#
#   stack/run-stack.sh
#
# Then point an app at the Collector as in docker-compose.yml (OTEL_EXPORTER_OTLP_ENDPOINT=
# http://localhost:4318) and open Jaeger on http://localhost:16686 (its HTTP API; the UI is a placeholder
# page in a build from the Go module) and Prometheus on http://localhost:9090.
#
# On one host the three cannot all listen where their containers do, so only addresses change: every
# listener binds 127.0.0.1, Jaeger takes OTLP on 14317/14318 (the Collector has 4317/4318) and the
# Collector's exporter sends there, the Collector's and Jaeger's own metrics go to 8888 and 14269, and
# Prometheus reads a copy of prometheus.yml whose only changes are the rules file's path and the target.
# Each port can be changed with the variable named below (tests/test_readme_commands.py does).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
config=$repo/collector-config
bin=$("$repo/stack/build-stack.sh")  # prints the directory at once when the binaries are built

otlp_grpc=${STACK_OTLP_GRPC_PORT:-4317}
otlp_http=${STACK_OTLP_HTTP_PORT:-4318}
health=${STACK_HEALTH_CHECK_PORT:-13133}
exporter=${STACK_PROMETHEUS_EXPORTER_PORT:-8889}
collector_telemetry=${STACK_COLLECTOR_TELEMETRY_PORT:-8888}
jaeger_ui=${STACK_JAEGER_UI_PORT:-16686}
jaeger_grpc=${STACK_JAEGER_GRPC_PORT:-16685}
jaeger_otlp_grpc=${STACK_JAEGER_OTLP_GRPC_PORT:-14317}
jaeger_otlp_http=${STACK_JAEGER_OTLP_HTTP_PORT:-14318}
jaeger_telemetry=${STACK_JAEGER_TELEMETRY_PORT:-14269}
prometheus_port=${STACK_PROMETHEUS_PORT:-9090}

prometheus=$bin/prometheus
[ -x "$prometheus" ] || prometheus=$(command -v prometheus) || {
    echo "run-stack.sh: no prometheus on PATH (apt-get install prometheus)" >&2
    exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/otel-bgtasks-stack.XXXXXX")
pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
    rm -rf "$work"
}
trap 'stop; exit 0' INT TERM  # Ctrl-C: a normal end
trap stop EXIT

telemetry() {  # the service's own metrics (a Prometheus endpoint) on 127.0.0.1:$1
    echo "--set=service.telemetry.metrics.readers=[{pull: {exporter: {prometheus: {host: 127.0.0.1, port: $1}}}}]"
}

# Prometheus: the compose file mounts the rules at this path and reaches the Collector by its service name.
sed -e "s|/etc/prometheus/rules/background-tasks.rules.yml|$config/background-tasks.rules.yml|" \
    -e "s|otel-collector:8889|127.0.0.1:$exporter|" "$config/prometheus.yml" >"$work/prometheus.yml"
"$prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus-data" \
    --web.listen-address="127.0.0.1:$prometheus_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)

# Jaeger traces its own queries to the OTLP default, localhost:4317: in its container, its own receiver.
OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$jaeger_otlp_grpc" "$bin/jaeger" --config="$config/jaeger.yaml" \
    --set=receivers.otlp.protocols.grpc.endpoint="127.0.0.1:$jaeger_otlp_grpc" \
    --set=receivers.otlp.protocols.http.endpoint="127.0.0.1:$jaeger_otlp_http" \
    --set=extensions.jaeger_query.http.endpoint="127.0.0.1:$jaeger_ui" \
    --set=extensions.jaeger_query.grpc.endpoint="127.0.0.1:$jaeger_grpc" \
    --set=extensions.jaeger_storage.metric_backends.span_metrics.prometheus.endpoint="http://127.0.0.1:$prometheus_port" \
    "$(telemetry "$jaeger_telemetry")" >"$work/jaeger.log" 2>&1 &
pids+=($!)

"$bin/otelcol" --config="$config/otel-collector.yaml" \
    --set=extensions.health_check.endpoint="127.0.0.1:$health" \
    --set=receivers.otlp.protocols.grpc.endpoint="127.0.0.1:$otlp_grpc" \
    --set=receivers.otlp.protocols.http.endpoint="127.0.0.1:$otlp_http" \
    --set=exporters.otlp/jaeger.endpoint="127.0.0.1:$jaeger_otlp_grpc" \
    --set=exporters.prometheus.endpoint="127.0.0.1:$exporter" \
    "$(telemetry "$collector_telemetry")" >"$work/otelcol.log" 2>&1 &
pids+=($!)

ready() {  # ready NAME URL: wait for a 200, or fail with the program's log
    local name=$1 url=$2 tries=0
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ] || ! kill -0 "${pids[@]}" 2>/dev/null; then
            echo "run-stack.sh: $name did not start; its log:" >&2
            tail -n 20 "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}
ready prometheus "http://127.0.0.1:$prometheus_port/-/ready"
ready jaeger "http://127.0.0.1:$jaeger_ui/"
ready otelcol "http://127.0.0.1:$health/"

cat <<EOF
ready: OTLP to the Collector on 127.0.0.1:$otlp_grpc (gRPC) and http://127.0.0.1:$otlp_http (HTTP)
       Jaeger      http://127.0.0.1:$jaeger_ui   (API: /api/traces, /api/services, /api/metrics/calls)
       Prometheus  http://127.0.0.1:$prometheus_port    (/api/v1/query, /api/v1/rules, /api/v1/alerts)
       logs in $work; Ctrl-C stops all three
EOF
wait -n "${pids[@]}" || true
echo "run-stack.sh: a program exited; stopping the others" >&2
exit 1
