"""The Prometheus rules in collector-config/: the real promtool, and the names the compose stack really produces.

promtool (Debian's ``prometheus`` package; .ci/run installs it) checks the rules and runs their unit
tests, collector-config/background-tasks.rules.test.yml, whose input series fire and do not fire each
alert. The rules must name metrics and labels as they arrive in Prometheus, which is not how the package
names its instruments: app --OTLP--> otel-collector --prometheus exporter--> Prometheus. There is no
Docker here to run the collector, so the names are derived the way it derives them:

1. A real app (the demo routes the compose stack serves) runs tasks that succeed, fail, are skipped and
   block the event loop, with the real SDK; its metrics are encoded by the SDK's OTLP encoder into the
   very protobuf the collector receives (name, unit, sum/gauge/histogram, monotonic).
2. ``prometheus_name`` applies the collector's translation to them: its prometheus exporter (contrib,
   default ``translation_strategy`` UnderscoreEscapingWithSuffixes, no ``namespace``) builds names with
   ``otlptranslator.MetricNamer{WithMetricSuffixes: true}`` (github.com/prometheus/otlptranslator,
   metric_namer.go, unit_namer.go) and label names with its ``LabelNamer``.
3. Where the SDK's own Prometheus exporter (opentelemetry-exporter-prometheus) is installed, its
   exposition of the same app's metrics must give the same names. Where the two could differ, the
   collector's rules win: it is the path the stack's users run.

Renaming an instrument in otel_bgtasks.semconv, or changing its unit or kind, breaks these tests.
"""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, MetricsData
from opentelemetry.sdk.trace import TracerProvider
from test_compose_stack import config_file, mounts, service

import otel_bgtasks
from otel_bgtasks import semconv
from otel_bgtasks.cli.demo_app import router
from otel_bgtasks.metrics import METER_NAME

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "collector-config" / "background-tasks.rules.yml"
RULES_TESTS = REPO / "collector-config" / "background-tasks.rules.test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: it comes with the distribution's prometheus package "
    "(apt-get install prometheus); .ci/run installs it where it can",
)

# -- The collector's OTLP -> Prometheus translation (otlptranslator, UnderscoreEscapingWithSuffixes) -----

# unit_namer.go / metric_namer.go: the unit's word appended to the name; "1" adds none.
UNIT_WORDS = {
    **{"d": "days", "h": "hours", "min": "minutes", "s": "seconds"},
    **{"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"},
    **{"By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes"},
    **{"KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes"},
    **{"m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams"},
    **{"Cel": "celsius", "Hz": "hertz", "1": "", "%": "percent"},
}
PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}


@dataclass(frozen=True)
class OtlpMetric:
    """What the collector knows of a metric when it names it."""

    name: str
    unit: str
    data: str  # the OTLP data kind: "sum", "gauge", "histogram", "exponential_histogram" or "summary"
    monotonic: bool = False


def _unit_word(unit: str, words: dict[str, str]) -> str:
    unit = unit.strip()
    if not unit or "{" in unit or "}" in unit:  # "{task}" is an annotation: no word
        return ""
    word = words.get(unit, unit)
    return re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9:]", "_", word)).removeprefix("_")


def prometheus_name(metric: OtlpMetric) -> str:
    """The metric's name in Prometheus, as the collector's prometheus exporter builds it (normalizeName)."""
    words = [word for word in re.split(r"[^a-zA-Z0-9:]+", metric.name) if word]
    main, _, per = metric.unit.partition("/")
    main_word = _unit_word(main, UNIT_WORDS)
    per_word = _unit_word(per, PER_UNIT_WORDS)
    if main_word and main_word not in words:
        words.append(main_word.removesuffix("_") if per_word else main_word)
    if per_word:
        words.append(f"per_{per_word}")
    if metric.data == "sum" and metric.monotonic:
        words = [word for word in words if word != "total"] + ["total"]
    if metric.unit == "1" and metric.data == "gauge":
        words = [word for word in words if word != "ratio"] + ["ratio"]
    name = "_".join(words)
    return f"_{name}" if name[:1].isdigit() else name


def prometheus_label(key: str) -> str:
    """An attribute key as a label name (LabelNamer: every run of other characters becomes one "_")."""
    label = re.sub(r"[^a-zA-Z0-9_]+", "_", key)
    return f"key_{label}" if label[:1].isdigit() else label


def series_names(metric: OtlpMetric) -> set[str]:
    """The series names one metric becomes: a histogram has three."""
    name = prometheus_name(metric)
    if metric.data == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (OtlpMetric("http.server.request.duration", "s", "histogram"), "http_server_request_duration_seconds"),
        (OtlpMetric("background_task.outcomes", "{task}", "sum", monotonic=True), "background_task_outcomes_total"),
        (OtlpMetric("requests.total", "1", "sum", monotonic=True), "requests_total"),
        (OtlpMetric("process.cpu.time", "s", "sum", monotonic=True), "process_cpu_time_seconds_total"),
        (OtlpMetric("db.client.connections.usage", "{connection}", "sum"), "db_client_connections_usage"),
        (OtlpMetric("system.memory.usage", "By", "gauge"), "system_memory_usage_bytes"),
        (OtlpMetric("cpu.utilization", "1", "gauge"), "cpu_utilization_ratio"),
        (OtlpMetric("network.io", "By/s", "gauge"), "network_io_bytes_per_second"),
        (OtlpMetric("queue.latency.seconds", "s", "histogram"), "queue_latency_seconds"),
        (OtlpMetric("traces.span.metrics.duration", "ms", "histogram"), "traces_span_metrics_duration_milliseconds"),
    ],
)
def test_translation_follows_the_collectors_rules(metric: OtlpMetric, expected: str) -> None:
    # The last case is the spanmetrics histogram whose Prometheus name Jaeger's config already relies on.
    assert prometheus_name(metric) == expected


# -- The package's real metrics ------------------------------------------------------------------------

# The counter of tasks that held the event loop past the threshold is being added to the package: until
# otel_bgtasks.semconv has METRIC_BLOCKED, the rules are written against the counter it is planned to be.
PLANNED = [] if hasattr(semconv, "METRIC_BLOCKED") else [OtlpMetric("background_task.blocked", "{task}", "sum", True)]


@dataclass(frozen=True)
class StackNames:
    """Metric and label names the compose stack's Prometheus has for otel_bgtasks."""

    metrics: dict[str, OtlpMetric]  # series name -> the OTLP metric it comes from
    labels: set[str]


def run_demo_tasks(*readers: MetricReader) -> None:
    """Serve the demo routes instrumented; tasks succeed, fail, are skipped, run in threads and block."""
    app = FastAPI()
    app.include_router(router)
    # A private tracer provider: these spans are not the point, and the session's exporter stays clean.
    otel_bgtasks.instrument(app, tracer_provider=TracerProvider(), meter_provider=MeterProvider(list(readers)))
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # /order's task raises

        async def requests() -> None:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for method, path in [("POST", "/signup"), ("POST", "/order"), ("GET", "/blocking")]:
                    await client.request(method, path)

        anyio.run(requests)
    finally:
        otel_bgtasks.uninstrument()


@pytest.fixture(scope="module")
def metrics_data() -> MetricsData:
    reader = InMemoryMetricReader()
    run_demo_tasks(reader)
    data = reader.get_metrics_data()
    assert data is not None
    return data


@pytest.fixture(scope="module")
def otlp_metrics(metrics_data: MetricsData) -> list[OtlpMetric]:
    """otel_bgtasks' metrics as the collector receives them: the SDK's OTLP protobuf of them."""
    request = encode_metrics(metrics_data)
    metrics = [
        OtlpMetric(m.name, m.unit, m.WhichOneof("data") or "", m.sum.is_monotonic)
        for resource in request.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == METER_NAME
        for m in scope.metrics
    ]
    return metrics + PLANNED


@pytest.fixture(scope="module")
def stack_names(metrics_data: MetricsData, otlp_metrics: list[OtlpMetric]) -> StackNames:
    metrics = {name: metric for metric in otlp_metrics for name in series_names(metric)}
    attribute_keys = {
        key
        for resource in metrics_data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == METER_NAME
        for metric in scope.metrics
        for point in metric.data.data_points
        for key in point.attributes or {}
    }
    # The exporter's own: job and instance (from service.name and service.instance.id), the scope as
    # otel_scope_*, le on histogram buckets, and target_info with the other resource attributes.
    labels = {"job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url", "le"}
    metrics["target_info"] = OtlpMetric("target_info", "", "gauge")
    resource_keys = {key for resource in metrics_data.resource_metrics for key in resource.resource.attributes}
    attribute_keys |= {key for key in resource_keys if not key.startswith("service.")}
    return StackNames(metrics, labels | {prometheus_label(key) for key in attribute_keys})


def test_the_app_produces_every_instrument_the_rules_watch(otlp_metrics: list[OtlpMetric]) -> None:
    produced = {metric.name: metric for metric in otlp_metrics}
    assert produced[semconv.METRIC_DURATION] == OtlpMetric(semconv.METRIC_DURATION, "s", "histogram")
    assert produced[semconv.THREADPOOL_WAIT] == OtlpMetric(semconv.THREADPOOL_WAIT, "s", "histogram")
    assert produced[semconv.METRIC_ACTIVE] == OtlpMetric(semconv.METRIC_ACTIVE, "{task}", "sum", monotonic=False)
    assert produced[semconv.METRIC_OUTCOMES] == OtlpMetric(semconv.METRIC_OUTCOMES, "{task}", "sum", monotonic=True)
    blocked = semconv.METRIC_BLOCKED
    assert produced[blocked] == OtlpMetric(blocked, "{task}", "sum", monotonic=True)


# -- What the rules and their unit tests use --------------------------------------------------------------

PROMQL_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"),
    *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"),
    *("quantile", "limitk", "limit_ratio", "Inf", "NaN", "inf", "nan"),
}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses; enough PromQL for rules, not a parser."""
    labels: set[str] = set()
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\boffset\s+\w+", " ", expr)
    identifiers = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in identifiers if name not in PROMQL_KEYWORDS}, labels


@cache
def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alerts() -> set[str]:
    return {rule["alert"] for rule in rules() if "alert" in rule}


def unit_tests() -> list[dict[str, Any]]:
    return load(RULES_TESTS)["tests"]


def used_names() -> Iterator[tuple[str, set[str], set[str]]]:
    """(where, metric names, label names) of every rule and of every unit test's series and expressions."""
    for rule in rules():
        yield rule.get("record") or rule["alert"], *promql_names(rule["expr"])
    for test in unit_tests():
        for series in test.get("input_series", []):
            yield f"{test['name']}: {series['series']}", *promql_names(series["series"])
        for check in test.get("promql_expr_test", []):
            yield f"{test['name']}: {check['expr']}", *promql_names(check["expr"])


def test_rules_use_only_names_the_stack_produces(stack_names: StackNames) -> None:
    for where, metrics, labels in used_names():
        unknown = metrics - stack_names.metrics.keys() - recorded()
        assert not unknown, f"{where}: {sorted(unknown)} is not in Prometheus; it has {sorted(stack_names.metrics)}"
        # Labels of recording rules are labels of their inputs, kept by "by (...)".
        unknown_labels = labels - stack_names.labels
        assert not unknown_labels, f"{where}: no label {sorted(unknown_labels)}; there are {sorted(stack_names.labels)}"


def test_rules_watch_every_health_metric(otlp_metrics: list[OtlpMetric]) -> None:
    used = {name for rule in rules() for name in promql_names(rule["expr"])[0]}
    watched = {semconv.METRIC_DURATION, semconv.THREADPOOL_WAIT, semconv.METRIC_ACTIVE, semconv.METRIC_OUTCOMES}
    watched.add(semconv.METRIC_BLOCKED)
    for metric in otlp_metrics:
        if metric.name in watched:
            assert series_names(metric) & used, f"no rule uses {metric.name} ({sorted(series_names(metric))})"


def expects_some_quiet(test: dict[str, Any], case: dict[str, Any]) -> bool:
    """Whether an alert case expects some task function of its input series not to fire."""
    pattern = r'code_function_name="([^"]*)"'
    functions = {name for series in test["input_series"] for name in re.findall(pattern, series["series"])}
    firing = {alert["exp_labels"]["code_function_name"] for alert in case.get("exp_alerts") or []}
    return bool(functions - firing)


def test_every_alert_has_cases_that_fire_and_cases_that_do_not() -> None:
    cases = [(test, case) for test in unit_tests() for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for _, case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for test, case in cases if expects_some_quiet(test, case)}
    assert alerts() <= firing, f"never expected to fire: {sorted(alerts() - firing)}"
    assert alerts() <= quiet, f"never expected to stay quiet: {sorted(alerts() - quiet)}"


def test_every_recording_rule_is_checked() -> None:
    checked = {
        name
        for test in unit_tests()
        for check in test.get("promql_expr_test", [])
        for name in promql_names(check["expr"])[0]
    }
    assert recorded() <= checked, f"no promql_expr_test for {sorted(recorded() - checked)}"


# -- Histogram buckets: the bounds the package gives --------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_bounds(metrics_data: MetricsData) -> list[float]:
    """The bounds the demo app's background_task.duration histogram was exported with."""
    (bounds,) = {
        tuple(point.explicit_bounds)
        for resource in metrics_data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == METER_NAME
        for metric in scope.metrics
        if metric.name == semconv.METRIC_DURATION
        for point in metric.data.data_points
    }
    if bounds[:4] == (0, 5, 10, 25):
        pytest.skip("this opentelemetry-sdk ignores bucket advice (< 1.30): README's View gives the bounds")
    return list(bounds)


def bucket_series() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The unit tests' ``_bucket`` series: (test, series without le) -> [(le, values)], in the file's order."""
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for test in unit_tests():
        for series in test.get("input_series", []):
            match = re.fullmatch(r'(\w+_bucket\{.*),le="([^"]+)"\}', series["series"])
            if match:
                grouped.setdefault((test["name"], match[1]), []).append((match[2], series["values"]))
    return grouped


def test_bucket_series_run_over_the_instruments_bounds(bucket_bounds: list[float]) -> None:
    """Consecutive real bounds, from an empty bucket (or the first) to a full one, then +Inf.

    The buckets left out are then empty (below) or full (above), and histogram_quantile() gives what it
    would give over the whole histogram the SDK exports.
    """
    groups = bucket_series()
    assert len(groups) >= 6
    for (test, series), buckets in groups.items():
        where = f"{test}: {series}"
        les = [le for le, _ in buckets]
        assert les[-1] == "+Inf", where
        finite = [float(le) for le in les[:-1]]
        assert all(le in bucket_bounds for le in finite), f"{where}: {finite} not among {bucket_bounds}"
        first = bucket_bounds.index(finite[0])
        assert finite == bucket_bounds[first : first + len(finite)], f"{where}: not consecutive bounds"
        assert first == 0 or re.fullmatch(r"0x\d+", buckets[0][1]), f"{where}: the lowest bucket is not empty"
        assert buckets[-2][1] == buckets[-1][1], f"{where}: the highest bucket does not hold every task"


def test_p95_thresholds_sit_on_bucket_bounds(bucket_bounds: list[float]) -> None:
    """histogram_quantile() interpolates inside a bucket: only at a bound is "p95 over it" exact."""
    thresholds = {
        rule["alert"]: float(match[1])
        for rule in rules()
        if "alert" in rule and (match := re.search(r"_seconds:p95_5m\s*>\s*([\d.]+)", rule["expr"]))
    }
    assert thresholds == {"BackgroundTaskSlow": 10.0, "BackgroundTaskThreadPoolSaturated": 1.0}
    assert set(thresholds.values()) <= set(bucket_bounds)


# -- The real promtool ------------------------------------------------------------------------------------


def promtool(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


def readme_promtool_commands() -> list[list[str]]:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith("promtool ")]


@needs_promtool
def test_the_readmes_promtool_commands_pass() -> None:
    commands = readme_promtool_commands()
    assert ["promtool", "check", "rules", str(RULES.relative_to(REPO))] in commands
    assert ["promtool", "test", "rules", str(RULES_TESTS.relative_to(REPO))] in commands
    for command in commands:
        result = promtool(*command[1:])
        assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout
        if command[1] == "check":
            assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# Rules broken on purpose: (rule, its broken expression, the alert whose unit tests must then fail).
BREAKAGES = [
    # Plain increase(): a function's first skipped task (a new series at 1) goes unseen.
    (
        "task_outcome:background_task_outcomes:increase5m",
        "sum by (job, code_function_name, background_task_outcome) (increase(background_task_outcomes_total[5m]))",
        "BackgroundTaskSkipped",
    ),
    # First values counted without the target_info condition: counts from before Prometheus looked fire.
    (
        "task_outcome:background_task_outcomes:increase5m",
        """sum by (job, code_function_name, background_task_outcome) (
             (background_task_outcomes_total unless background_task_outcomes_total offset 5m)
           or increase(background_task_outcomes_total[5m]))""",
        "BackgroundTaskSkipped",
    ),
    # Timeouts not counted as failures.
    (
        "task:background_task_failures:ratio5m",
        """sum by (job, code_function_name) (
             task_outcome:background_task_outcomes:increase5m{background_task_outcome="error"})
           / sum by (job, code_function_name) (
             task_outcome:background_task_outcomes:increase5m{background_task_outcome!~"skipped|dropped"})""",
        "BackgroundTaskFailing",
    ),
    # A threshold under what charge_card's tasks take (p95 9.95 s): it fires for a function that is not slow.
    ("BackgroundTaskSlow", "task:background_task_duration_seconds:p95_5m > 5", "BackgroundTaskSlow"),
    # The threshold the SDK's default buckets (0, 5, 10 ...) allowed: waits of 1 to 2.5 s for a thread go unseen.
    (
        "BackgroundTaskThreadPoolSaturated",
        "task:background_task_threadpool_wait_seconds:p95_5m > 5",
        "BackgroundTaskThreadPoolSaturated",
    ),
    # A p95 over every bucket but le: no quantile, nothing ever fires.
    (
        "task:background_task_threadpool_wait_seconds:p95_5m",
        """histogram_quantile(0.95, sum by (job, code_function_name) (
             rate(background_task_threadpool_wait_seconds_bucket[5m])))""",
        "BackgroundTaskThreadPoolSaturated",
    ),
]


@needs_promtool
def test_promtool_unit_tests_catch_broken_rules(tmp_path: Path) -> None:
    test_files = []
    for number, (name, broken, failing_alert) in enumerate(BREAKAGES):
        document = yaml.safe_load(RULES.read_text())  # a fresh copy: load() is cached
        (rule,) = (rule for group in document["groups"] for rule in group["rules"] if name in rule.values())
        rule["expr"] = broken
        directory = tmp_path / str(number)
        directory.mkdir()
        (directory / RULES.name).write_text(yaml.safe_dump(document))
        # Only the unit tests of that alert: promtool's time grows with the number of tests.
        tests = yaml.safe_load(RULES_TESTS.read_text())
        tests["tests"] = [
            test
            for test in tests["tests"]
            if any(case["alertname"] == failing_alert for case in test.get("alert_rule_test", []))
        ]
        (directory / RULES_TESTS.name).write_text(yaml.safe_dump(tests))
        test_files.append(directory / RULES_TESTS.name)
    # One promtool run for all: it tests the files in order, each failure a "FAILED:" block on stderr.
    result = promtool("test", "rules", *test_files, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = result.stderr.split("FAILED:")[1:]
    assert len(failures) == len(BREAKAGES), result.stdout + result.stderr
    for failure, (name, broken, failing_alert) in zip(failures, BREAKAGES, strict=True):
        assert f"alertname: {failing_alert}," in failure, (name, broken, failure)


@needs_promtool
def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    """prometheus.yml as the container reads it: its rule_files resolved through docker-compose.yml's mounts."""
    config = yaml.safe_load(config_file("prometheus").read_text())
    mounted = mounts(service("prometheus"))
    config["rule_files"] = [str(mounted[path][0]) for path in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# -- Cross-check: the SDK's own Prometheus exporter -------------------------------------------------------


def test_the_sdks_prometheus_exporter_names_them_the_same(otlp_metrics: list[OtlpMetric]) -> None:
    exporter = pytest.importorskip(
        "opentelemetry.exporter.prometheus", reason="pip install opentelemetry-exporter-prometheus to cross-check"
    )
    from prometheus_client import CollectorRegistry, generate_latest

    if "registry" not in inspect.signature(exporter.PrometheusMetricReader).parameters:
        pytest.skip("this opentelemetry-exporter-prometheus has no registry= (it would register process-wide)")
    registry = CollectorRegistry()
    run_demo_tasks(exporter.PrometheusMetricReader(registry=registry))
    exposition = generate_latest(registry).decode()
    exposed = set(re.findall(r"^(background_task\w*)[{ ]", exposition, re.MULTILINE))
    assert exposed == {name for metric in otlp_metrics if metric not in PLANNED for name in series_names(metric)}
