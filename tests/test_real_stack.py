"""The docker-compose stack run for real, without Docker: Collector, Jaeger and Prometheus on 127.0.0.1.

The programs are the releases docker-compose.yml pins: the OpenTelemetry Collector 0.139.0, Jaeger
2.12.0 and Prometheus 3.16.0, built from their Go modules by stack/build-stack.sh (.ci/run builds them).
Each runs with the repository's own config, the file compose mounts; only addresses change: every
listener gets a free port on 127.0.0.1 (``--set`` for the Collector and Jaeger, a copy of prometheus.yml
whose only other change is a 1 s scrape and rule interval). The app is compose's too:
examples/fastapi_app.py under ``opentelemetry-instrument uvicorn`` (the Dockerfile's command), configured
by the ``OTEL_*`` variables of compose's app service, pointed at the test's Collector, with metrics every
0.5 s.

What is checked is what a user sees: the traces through Jaeger's query API, PromQL answers, the rules'
and alerts' states, Jaeger's Monitor (SPM) API, what the tail-sampling profile keeps, and an app that
goes on unharmed while its Collector is restarted. Without the binaries every test skips and says
how to get them (``STACK_REQUIRED=1``, as .ci/run sets it, makes that a failure).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from test_otlp_end_to_end import Server, free_port, serving

from otel_bgtasks.metrics import _BUCKET_ADVICE, BUCKET_BOUNDS  # pyright: ignore[reportPrivateUsage]

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "collector-config"
BUILD_SCRIPT = REPO / "stack" / "build-stack.sh"
DEMO = "otel_bgtasks.cli.demo_app"
WAIT_SECONDS = 45  # for data to travel app -> Collector -> Jaeger / Prometheus, on 2 busy cores
START_SECONDS = 30

pytestmark = [pytest.mark.real_stack, pytest.mark.timeout(240)]

T = TypeVar("T")


# -- The programs -----------------------------------------------------------------------------------


def released(variable: str) -> str:
    found = re.search(rf"^{variable}=(\S+)", BUILD_SCRIPT.read_text(), re.MULTILINE)
    assert found is not None, f"stack/build-stack.sh sets no {variable}"
    return found.group(1)


def stack_bin() -> Path:
    """Where stack/build-stack.sh puts the binaries (the same rule as the script's)."""
    if os.environ.get("OTEL_BGTASKS_STACK_BIN"):
        return Path(os.environ["OTEL_BGTASKS_STACK_BIN"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    releases = f"otelcol-{released('OTELCOL_VERSION')}-jaeger-{released('JAEGER_VERSION')}"
    return cache / "otel-bgtasks-stack" / f"{releases}-prometheus-{released('PROMETHEUS_VERSION')}"


@dataclass(frozen=True)
class Binaries:
    otelcol: Path
    jaeger: Path
    prometheus: Path


@pytest.fixture(scope="module")
def binaries() -> Binaries:
    directory = stack_bin()
    programs = [directory / name for name in ("otelcol", "jaeger", "prometheus")]
    missing = [str(program) for program in programs if not program.is_file()]
    if missing:
        reason = f"the stack's programs are not built: {', '.join(missing)}; run stack/build-stack.sh (needs Go)"
        if os.environ.get("STACK_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Binaries(directory / "otelcol", directory / "jaeger", directory / "prometheus")


class Program:
    """A program in its own process group, its output in a log file; stopped with SIGTERM, else killed."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"{self.name} exited:\n{self.output()}"


@contextmanager
def started(*programs: Program) -> Iterator[None]:
    try:
        for program in programs:
            program.start()
        yield
    finally:
        for program in reversed(programs):
            program.stop()


def wait_for(what: str, probe: Callable[[], T | None], seconds: float = WAIT_SECONDS, *watch: Program) -> T:
    """Poll ``probe`` until it returns something true (a non-empty answer); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        for program in watch:
            program.assert_running()
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.output()}" for p in watch)
            raise AssertionError(f"{what}: not within {seconds} s\n{logs}")
        time.sleep(0.2)


def get_json(url: str, **params: Any) -> Any:
    try:
        response = httpx.get(url, params=params, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def telemetry_on(port: int) -> str:
    """A program's own metrics on 127.0.0.1 (they default to port 8888 on every interface)."""
    reader = f"{{pull: {{exporter: {{prometheus: {{host: 127.0.0.1, port: {port}}}}}}}}}"
    return f"--set=service.telemetry.metrics.readers=[{reader}]"


@dataclass
class Collector:
    """The Collector with collector-config/otel-collector.yaml (and ``overlays``), listening on free ports."""

    binaries: Binaries
    logs: Path
    jaeger_otlp: int
    overlays: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: {})
    name: str = "otelcol"
    otlp_grpc: int = field(default_factory=free_port)
    otlp_http: int = field(default_factory=free_port)
    health: int = field(default_factory=free_port)
    exporter: int = field(default_factory=free_port)
    telemetry: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        configs = [f"--config={path}" for path in (CONFIG / "otel-collector.yaml", *self.overlays)]
        argv = [
            str(self.binaries.otelcol),
            *configs,
            f"--set=extensions.health_check.endpoint=127.0.0.1:{self.health}",
            f"--set=receivers.otlp.protocols.grpc.endpoint=127.0.0.1:{self.otlp_grpc}",
            f"--set=receivers.otlp.protocols.http.endpoint=127.0.0.1:{self.otlp_http}",
            f"--set=exporters.otlp/jaeger.endpoint=127.0.0.1:{self.jaeger_otlp}",
            f"--set=exporters.prometheus.endpoint=127.0.0.1:{self.exporter}",
            telemetry_on(self.telemetry),
        ]
        self.program = Program(self.name, argv, self.logs, {**clean_environment(), **self.env})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.otlp_http}"

    def start(self) -> None:
        self.program.start()
        wait_for("the Collector's health_check", lambda: answers(f"http://127.0.0.1:{self.health}/"), START_SECONDS)

    def metrics_text(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.exporter}/metrics", timeout=5).text


@dataclass
class Stack:
    collector: Collector
    jaeger: Program
    prometheus: Program
    jaeger_url: str
    jaeger_otlp: int
    prometheus_url: str
    logs: Path
    binaries: Binaries

    @property
    def programs(self) -> tuple[Program, ...]:
        return (self.collector.program, self.jaeger, self.prometheus)

    def traces(self, service: str, operation: str | None = None) -> list[JaegerTrace]:
        params = {"service": service, "limit": 200, "lookback": "1h"}
        if operation is not None:
            params["operation"] = operation
        found = get_json(f"{self.jaeger_url}/api/traces", **params)
        return [JaegerTrace(trace) for trace in (found or {}).get("data") or []]

    def promql(self, query: str) -> list[dict[str, Any]] | None:
        found = get_json(f"{self.prometheus_url}/api/v1/query", query=query)
        return None if found is None else found["data"]["result"]


def prometheus_config(exporter_port: int) -> dict[str, Any]:
    """collector-config/prometheus.yml as compose runs it, but for this host: the rules file's path, the
    Collector's address, and 1 s instead of 5 s between scrapes and rule evaluations."""
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/background-tasks.rules.yml"]
    config["rule_files"] = [str(CONFIG / "background-tasks.rules.yml")]
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["otel-collector:8889"]}]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    config["global"] = {**config["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    return config


@pytest.fixture(scope="module")
def stack(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("stack")
    jaeger_otlp, jaeger_ui, prometheus_port = free_port(), free_port(), free_port()
    collector = Collector(binaries, logs, jaeger_otlp)
    (logs / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(collector.exporter)))
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    prometheus = Program(
        "prometheus",
        [
            str(binaries.prometheus),
            f"--config.file={logs / 'prometheus.yml'}",
            f"--storage.tsdb.path={logs / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        logs,
    )
    jaeger = Program(
        "jaeger",
        [
            str(binaries.jaeger),
            f"--config={CONFIG / 'jaeger.yaml'}",
            f"--set=receivers.otlp.protocols.grpc.endpoint=127.0.0.1:{jaeger_otlp}",
            f"--set=receivers.otlp.protocols.http.endpoint=127.0.0.1:{free_port()}",
            f"--set=extensions.jaeger_query.http.endpoint=127.0.0.1:{jaeger_ui}",
            f"--set=extensions.jaeger_query.grpc.endpoint=127.0.0.1:{free_port()}",
            f"--set=extensions.jaeger_storage.metric_backends.span_metrics.prometheus.endpoint={prometheus_url}",
            telemetry_on(free_port()),
        ],
        logs,
        # Jaeger traces its own queries to the OTLP default, localhost:4317: in its container that is its own
        # receiver, and here it must be too (not whatever listens on this host's 4317).
        {**clean_environment(), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{jaeger_otlp}"},
    )
    stack = Stack(
        collector, jaeger, prometheus, f"http://127.0.0.1:{jaeger_ui}", jaeger_otlp, prometheus_url, logs, binaries
    )
    with started(prometheus, jaeger):
        try:
            wait_for("Prometheus ready", lambda: answers(f"{prometheus_url}/-/ready"), START_SECONDS, prometheus)
            wait_for("Jaeger's query API", lambda: get_json(f"{stack.jaeger_url}/api/services"), START_SECONDS, jaeger)
            collector.start()
            yield stack
        finally:
            collector.program.stop()


# -- The app ----------------------------------------------------------------------------------------


def clean_environment() -> dict[str, str]:
    """This process's environment without the OpenTelemetry variables a test run may have set."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}


def compose_app_environment() -> dict[str, str]:
    """The ``environment`` of docker-compose.yml's app service."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return {key: str(value) for key, value in compose["services"]["app"]["environment"].items()}


def dockerfile_command() -> list[str]:
    """The Dockerfile's CMD without its --host/--port (serving() adds 127.0.0.1 and a free port)."""
    (cmd,) = re.findall(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    args: list[str] = yaml.safe_load(cmd)
    return args[: args.index("--host")]


@contextmanager
def compose_app(collector: Collector, service: str, logs: Path, **variables: str) -> Iterator[Server]:
    """examples/fastapi_app.py as compose's app service runs it, sending to ``collector``."""
    env = clean_environment()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(compose_app_environment())
    env.update(
        OTEL_SERVICE_NAME=service,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_METRIC_EXPORT_INTERVAL="500",
        OTEL_BSP_SCHEDULE_DELAY="200",
        # The test extra installs opentelemetry-instrumentation-logging; the image does not.
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="logging",
        **variables,
    )
    with serving(dockerfile_command(), env, logs / f"{service}.log") as server:
        yield server


def send(server: Server, *requests: str) -> None:
    # A connection per request: /order's task raises after the response, and uvicorn closes that connection.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:
        for request in requests:
            method, path = request.split(" ", 1)
            response = client.request(method, path)
            assert response.status_code == 200, (request, response.text)


def new_service(kind: str) -> str:
    return f"real-stack-{kind}-{uuid.uuid4().hex[:8]}"


# -- Jaeger's answers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JaegerSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None  # the CHILD_OF reference
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of the FOLLOWS_FROM references: OTLP links
    tags: dict[str, Any]
    events: tuple[dict[str, Any], ...]  # each log's fields, "event" holding the event's name
    start_us: int
    duration_us: int

    @classmethod
    def of(cls, span: dict[str, Any]) -> JaegerSpan:
        references = span.get("references") or []
        parents = [ref["spanID"] for ref in references if ref["refType"] == "CHILD_OF"]
        assert len(parents) <= 1, span
        return cls(
            name=span["operationName"],
            trace_id=span["traceID"],
            span_id=span["spanID"],
            parent_id=parents[0] if parents else None,
            links=tuple((ref["traceID"], ref["spanID"]) for ref in references if ref["refType"] == "FOLLOWS_FROM"),
            tags={tag["key"]: tag["value"] for tag in span.get("tags") or []},
            events=tuple({f["key"]: f["value"] for f in log["fields"]} for log in span.get("logs") or []),
            start_us=span["startTime"],
            duration_us=span["duration"],
        )

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]


class JaegerTrace:
    def __init__(self, data: dict[str, Any]) -> None:
        self.trace_id: str = data["traceID"]
        self.spans = [JaegerSpan.of(span) for span in data["spans"]]
        self.by_id = {span.span_id: span for span in self.spans}

    def named(self, name: str) -> list[JaegerSpan]:
        return [span for span in self.spans if span.name == name]

    def root(self) -> JaegerSpan:
        (root,) = [span for span in self.spans if span.parent_id is None]
        return root

    def request(self) -> JaegerSpan | None:
        """The SERVER span, if this is a request's trace."""
        servers = [span for span in self.spans if span.tags.get("span.kind") == "server"]
        assert len(servers) <= 1, [span.name for span in self.spans]
        return servers[0] if servers else None

    def ancestors(self, span: JaegerSpan) -> list[JaegerSpan]:
        chain = []
        while span.parent_id is not None:
            assert span.parent_id in self.by_id, f"the parent of {span.name} is not in its trace"
            span = self.by_id[span.parent_id]
            chain.append(span)
        return chain

    def describe(self) -> str:
        return "; ".join(f"{s.name} {s.tags.get('background_task.outcome', '')}".strip() for s in self.spans)


def route_of(trace: JaegerTrace) -> str | None:
    request = trace.request()
    return None if request is None else request.name  # "POST /order": method and route


def traces_by_route(stack: Stack, service: str) -> dict[str, list[JaegerTrace]]:
    found: dict[str, list[JaegerTrace]] = {}
    for trace in stack.traces(service):
        route = route_of(trace)
        if route is not None:
            found.setdefault(route, []).append(trace)
    return found


def task_spans(trace: JaegerTrace) -> list[JaegerSpan]:
    return sorted(
        (span for span in trace.spans if span.name.startswith("BackgroundTask ")),
        key=lambda span: span.tags.get("background_task.index", 0),
    )


def complete(trace: JaegerTrace, tasks: int) -> JaegerTrace | None:
    return trace if len(task_spans(trace)) == tasks else None


def assert_task_span(span: JaegerSpan, function: str, outcome: str, execution: str) -> None:
    assert span.name == f"BackgroundTask {function}"
    assert span.tags["span.kind"] == "internal"
    assert span.tags["code.function.name"] == f"{DEMO}.{function}"
    assert span.tags["code.file.path"].endswith(os.path.join("otel_bgtasks", "cli", "demo_app.py"))
    assert span.tags["background_task.outcome"] == outcome
    assert span.tags["background_task.execution"] == execution
    assert span.tags["otel.scope.name"] == "otel_bgtasks.instrumentor"
    if outcome == "success":
        assert span.tags.get("otel.status_code") != "ERROR" and "error" not in span.tags
        assert span.events_named("exception") == []


def assert_failed_charge(charge: JaegerSpan) -> None:
    assert_task_span(charge, "charge_card", "error", "threadpool")
    assert charge.tags["otel.status_code"] == "ERROR" and charge.tags["error"] is True
    message = "order 1042: card declined (insufficient funds) for 49.99 EUR"
    assert charge.tags["otel.status_description"] == message
    assert charge.tags["error.type"] == f"{DEMO}.PaymentDeclinedError"
    (exception,) = charge.events_named("exception")
    assert exception["exception.type"] == f"{DEMO}.PaymentDeclinedError"
    assert exception["exception.message"] == message
    assert "in charge_card" in exception["exception.stacktrace"]


# -- 0. The programs are the releases docker-compose.yml pins ----------------------------------------


def compose_tag(service: str) -> str:
    image = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][service]["image"]
    return str(image).rsplit(":", 1)[1]


def test_programs_are_the_releases_compose_pins(binaries: Binaries) -> None:
    def first_line(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        return (done.stdout + done.stderr).splitlines()[0]

    assert first_line(str(binaries.otelcol), "--version") == f"otelcol version {compose_tag('otel-collector')}"
    assert f"git-version=v{compose_tag('jaeger')}," in first_line(str(binaries.jaeger), "version")
    # "prometheus, version 3.16.0 (branch: ...)" for the image prom/prometheus:v3.16.0
    version = re.match(r"prometheus, version (\d+\.\d+\.\d+)", first_line(str(binaries.prometheus), "--version"))
    assert version is not None and f"v{version.group(1)}" == compose_tag("prometheus")
    if shutil.which("go") is None:
        return  # the modules compiled in, as Go records them in the binary: only with a go command
    modules = subprocess.run(["go", "version", "-m", str(binaries.otelcol)], capture_output=True, text=True, check=True)
    collector = re.findall(
        r"^\s+dep\s+(go\.opentelemetry\.io/collector\S*|github\.com/open-telemetry/opentelemetry-collector-contrib/\S+)"
        r"\s+(\S+)",
        modules.stdout,
        re.MULTILINE,
    )
    assert len(collector) > 50
    assert {version for module, version in collector if not module.endswith("/semconv")} == {"v0.139.0", "v1.45.0"}
    jaeger = subprocess.run(["go", "version", "-m", str(binaries.jaeger)], capture_output=True, text=True, check=True)
    assert re.search(r"^\s+mod\s+github\.com/jaegertracing/jaeger\s+v1\.75\.0\s", jaeger.stdout, re.MULTILINE)


# -- 1. Traces: app -> Collector -> Jaeger ----------------------------------------------------------


@dataclass
class ChildRun:
    """The child-mode app's traffic: every request twice, the second round once Prometheus had the first."""

    service: str
    app_output: str


ROUND = ("POST /order", "POST /signup", "GET /blocking")


@pytest.fixture(scope="module")
def child_run(stack: Stack) -> ChildRun:
    service = new_service("child")
    job = f'job="{service}"'
    skipped = f'background_task_outcomes_total{{{job}, background_task_outcome="skipped"}}'
    blocked = f"background_task_blocked_total{{{job}}}"
    charges = f'traces_span_metrics_calls_total{{service_name="{service}", span_name="BackgroundTask charge_card"}}'

    def counted(times: int) -> bool:
        return all(stack.promql(f"{series} == {times}") for series in (skipped, blocked, charges))

    with compose_app(stack.collector, service, stack.logs) as server:
        send(server, *ROUND)
        # The first values only set Prometheus' baseline (rules: increase() over 5 minutes): wait until it
        # has them, and the span metrics too, then send the same requests again.
        wait_for("the first round's counts in Prometheus", lambda: counted(1), WAIT_SECONDS, *stack.programs)
        send(server, *ROUND)
        wait_for("the second round's counts in Prometheus", lambda: counted(2), WAIT_SECONDS, *stack.programs)
    return ChildRun(service, server.output())


def test_child_mode_traces_reach_jaeger_with_every_task_span(stack: Stack, child_run: ChildRun) -> None:
    expected = {"POST /order": 2, "POST /signup": 2, "GET /blocking": 1}  # task spans per request

    def arrived() -> dict[str, list[JaegerTrace]] | None:
        found = traces_by_route(stack, child_run.service)
        done = {route: [t for t in found.get(route, []) if complete(t, tasks)] for route, tasks in expected.items()}
        return done if all(len(traces) == 2 for traces in done.values()) else None

    found = wait_for("both rounds' traces in Jaeger", arrived, WAIT_SECONDS, *stack.programs)
    for trace in found["POST /order"]:
        request = trace.request()
        assert request is not None and trace.root() is request, trace.describe()
        assert request.tags.get("http.response.status_code", request.tags.get("http.status_code")) == 200
        charge, receipt = task_spans(trace)
        assert_failed_charge(charge)
        assert_task_span(receipt, "send_receipt", "skipped", "threadpool")
        assert (charge.tags["background_task.index"], receipt.tags["background_task.index"]) == (0, 1)
        assert receipt.events_named("exception") == [] and "otel.status_code" not in receipt.tags
        # Child mode: both under the span current in the route, in the request's trace (the request span,
        # or the route's own span below it where FastAPI traces its endpoint).
        assert charge.parent_id == receipt.parent_id and charge.links == receipt.links == ()
        parent = trace.by_id[charge.parent_id or ""]
        assert parent is request or (
            request in trace.ancestors(parent) and parent.tags["code.function.name"] == f"{DEMO}.order"
        )
        assert charge.trace_id == receipt.trace_id == request.trace_id
        # The client had its answer first: the tasks start after the request span's last body chunk was sent.
        assert charge.start_us >= request.start_us and charge.tags["background_task.queue.duration"] > 0
    for trace in found["POST /signup"]:
        welcome, newsletter = task_spans(trace)
        assert_task_span(welcome, "send_welcome_email", "success", "threadpool")
        assert_task_span(newsletter, "add_to_newsletter", "success", "async")
        assert welcome.duration_us >= 20_000  # time.sleep(0.02)
    for trace in found["GET /blocking"]:
        (resize,) = task_spans(trace)
        assert_task_span(resize, "resize_images", "success", "async")
        assert resize.tags["background_task.blocking.max"] >= 0.19  # time.sleep(0.2) on the event loop
        assert len(resize.events_named("background_task.event_loop_blocked")) == 1
    assert "Failed to export" not in child_run.app_output, child_run.app_output


def test_link_mode_tasks_start_traces_linked_to_the_request(stack: Stack) -> None:
    service = new_service("link")
    with compose_app(stack.collector, service, stack.logs, OTEL_PYTHON_BGTASKS_MODE="link") as server:
        send(server, "POST /order")

    def arrived() -> tuple[JaegerTrace, list[JaegerSpan]] | None:
        traces = stack.traces(service)
        requests = [t for t in traces if route_of(t) == "POST /order"]
        tasks = [span for t in traces for span in task_spans(t)]
        return (requests[0], tasks) if len(requests) == 1 and len(tasks) == 2 else None

    trace, tasks = wait_for("the request's trace and two task traces in Jaeger", arrived, WAIT_SECONDS, *stack.programs)
    request = trace.request()
    assert request is not None
    assert task_spans(trace) == []  # no task span in the request's trace: each started its own
    charge, receipt = sorted(tasks, key=lambda span: span.tags["background_task.index"])
    assert_failed_charge(charge)
    assert_task_span(receipt, "send_receipt", "skipped", "threadpool")
    for task in (charge, receipt):
        assert task.parent_id is None and task.trace_id not in (request.trace_id,)
        # Linked to the span current in the route, which is in the request's trace.
        ((linked_trace, linked_span),) = task.links
        assert linked_trace == request.trace_id and linked_span in trace.by_id
        linked = trace.by_id[linked_span]
        assert linked is request or request in trace.ancestors(linked)
        # ...which keeps the trail: a background_task.enqueued event per task.
        enqueued = [event["code.function.name"] for event in linked.events_named("background_task.enqueued")]
        assert enqueued == [f"{DEMO}.charge_card", f"{DEMO}.send_receipt"]
    assert charge.trace_id != receipt.trace_id


# -- 2. Metrics and rules: Collector -> Prometheus --------------------------------------------------


def values(result: list[dict[str, Any]] | None, *labels: str) -> dict[tuple[str, ...], float]:
    assert result is not None
    return {tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1]) for sample in result}


def test_promql_returns_duration_buckets_and_outcome_counts(stack: Stack, child_run: ChildRun) -> None:
    job = f'job="{child_run.service}"'
    outcomes = values(
        stack.promql(f"background_task_outcomes_total{{{job}}}"), "code_function_name", "background_task_outcome"
    )
    assert outcomes == {
        (f"{DEMO}.charge_card", "error"): 2,
        (f"{DEMO}.send_receipt", "skipped"): 2,
        (f"{DEMO}.send_welcome_email", "success"): 2,
        (f"{DEMO}.add_to_newsletter", "success"): 2,
        (f"{DEMO}.resize_images", "success"): 2,
    }
    # Duration histograms per function and outcome: the +Inf bucket counts every task that ran.
    buckets = values(
        stack.promql(f'background_task_duration_seconds_bucket{{{job}, le="+Inf"}}'),
        "code_function_name",
        "background_task_outcome",
    )
    assert buckets == {key: value for key, value in outcomes.items() if key[1] != "skipped"}
    # otel_bgtasks' own bounds in seconds (metrics.BUCKET_BOUNDS, given to the SDK as advice), not the SDK's
    # default (0, 5, 10, ...): resize_images (0.2 s) is above 0.1 s and well under 2.5 s.
    resize = f'{job}, code_function_name="{DEMO}.resize_images"'
    found = values(stack.promql(f"background_task_duration_seconds_bucket{{{resize}}}"), "le")
    bounds = {float(le): count for (le,), count in found.items()}  # "5" or "5.0": Prometheus 3 normalises it
    if not _BUCKET_ADVICE:  # an SDK older than 1.30 takes no advice: its default bounds (README, Metrics)
        assert bounds[0] == 0 and bounds[5] == bounds[10] == bounds[float("inf")] == 2, bounds
    else:
        assert sorted(bounds) == [*BUCKET_BOUNDS, float("inf")], bounds
        assert bounds[0.1] == 0 and bounds[2.5] == bounds[10] == bounds[float("inf")] == 2, bounds
    blocked = values(stack.promql(f"background_task_blocked_total{{{job}}}"), "code_function_name")
    assert blocked == {(f"{DEMO}.resize_images",): 2}
    # The span metrics of the same tasks (the spanmetrics connector), with their outcome dimension.
    calls = values(
        stack.promql(
            f'traces_span_metrics_calls_total{{service_name="{child_run.service}", span_kind="SPAN_KIND_INTERNAL"}}'
        ),
        "span_name",
        "status_code",
        "background_task_outcome",
    )
    assert calls[("BackgroundTask charge_card", "STATUS_CODE_ERROR", "error")] == 2
    assert calls[("BackgroundTask send_receipt", "STATUS_CODE_UNSET", "skipped")] == 2


def test_alert_rules_load_healthy_and_fire_for_skipped_and_blocking_tasks(stack: Stack, child_run: ChildRun) -> None:
    rules = get_json(f"{stack.prometheus_url}/api/v1/rules")
    (group,) = rules["data"]["groups"]
    assert group["name"] == "otel_bgtasks" and group["file"] == str(CONFIG / "background-tasks.rules.yml")
    assert len(group["rules"]) == 12
    assert {rule["name"]: rule["health"] for rule in group["rules"]} == dict.fromkeys(
        (rule["name"] for rule in group["rules"]), "ok"
    )

    def alerts() -> dict[tuple[str, str], str] | None:
        found = get_json(f"{stack.prometheus_url}/api/v1/alerts")
        states = {
            (alert["labels"]["alertname"], alert["labels"]["code_function_name"]): alert["state"]
            for alert in found["data"]["alerts"]
            if alert["labels"].get("job") == child_run.service
        }
        wanted = {
            ("BackgroundTaskSkipped", f"{DEMO}.send_receipt"): "firing",
            ("BackgroundTaskBlockingEventLoop", f"{DEMO}.resize_images"): "firing",
            # All of charge_card's tasks failed: pending, and firing after the rule's 10 minutes.
            ("BackgroundTaskFailing", f"{DEMO}.charge_card"): "pending",
        }
        if not _BUCKET_ADVICE:
            # An SDK older than 1.30 takes no bucket advice, and this app (opentelemetry-instrument) registers
            # no View: every wait for a worker thread falls in the default first bucket (0, 5], whose p95
            # histogram_quantile() reads 4.75 s, over the rule's 1 s, for each def task that ran: README
            # (Metrics, Alerts) says so and gives the View.
            wanted.update(
                dict.fromkeys(
                    (
                        ("BackgroundTaskThreadPoolSaturated", f"{DEMO}.{name}")
                        for name in ("charge_card", "send_welcome_email")
                    ),
                    "pending",
                )
            )
        seen.append(states)
        return states if states == wanted else None

    seen: list[dict[tuple[str, str], str]] = []
    try:
        wait_for("the alerts", alerts, WAIT_SECONDS, *stack.programs)
    except AssertionError as exc:
        records = {
            name: stack.promql(f'{name}{{job="{child_run.service}"}}')
            for name in ("task_outcome:background_task_outcomes:increase5m", "task:background_task_blocked:increase5m")
        }
        raise AssertionError(f"{exc}\nlast seen: {seen[-1:]}\nrecords: {records}") from None
    firing = get_json(f"{stack.prometheus_url}/api/v1/alerts")["data"]["alerts"]
    (skipped,) = [
        a
        for a in firing
        if a["labels"]["alertname"] == "BackgroundTaskSkipped" and a["labels"].get("job") == child_run.service
    ]
    assert skipped["annotations"]["summary"].startswith(
        f"{DEMO}.send_receipt of {child_run.service}: background tasks skipped"
    )


# -- 3. Jaeger's Monitor tab (SPM), from Prometheus --------------------------------------------------


def test_jaeger_monitor_api_returns_call_and_error_rates(stack: Stack, child_run: ChildRun) -> None:
    def rates(kind: str) -> dict[str, float] | None:
        found = get_json(
            f"{stack.jaeger_url}/api/metrics/{kind}",
            service=child_run.service,
            spanKind="internal",
            groupByOperation="true",
            endTs=str(int(time.time() * 1000)),
            lookback="300000",
            step="1000",
            ratePer="60000",
        )
        if found is None:
            return None
        result = {}
        for metric in found["metrics"]:
            labels = {label["name"]: label["value"] for label in metric["labels"]}
            # A point is a number, or "NaN" where a ratio had nothing to divide.
            points = [float(p["gaugeValue"]["doubleValue"]) for p in metric["metricPoints"]]
            result[labels["operation"]] = max((p for p in points if p == p), default=0.0)
        return result

    tasks = {
        f"BackgroundTask {name}"
        for name in ("charge_card", "send_receipt", "send_welcome_email", "add_to_newsletter", "resize_images")
    }
    calls = wait_for(
        "call rates for every task",
        lambda: (r := rates("calls")) and tasks <= {op for op, rate in r.items() if rate > 0} and r,
        WAIT_SECONDS,
        *stack.programs,
    )
    assert all(calls[task] > 0 for task in tasks)
    errors = wait_for("error rates", lambda: rates("errors"), WAIT_SECONDS, *stack.programs)
    # Every charge_card call failed: an error ratio of 1; 0 for the others (a skipped task is no error).
    assert errors["BackgroundTask charge_card"] == pytest.approx(1.0)
    assert all(errors.get(task, 0.0) == 0.0 for task in tasks - {"BackgroundTask charge_card"})


# -- 4. The tail-sampling profile -------------------------------------------------------------------


def test_tail_sampling_keeps_failed_skipped_blocking_and_slow_tasks_and_drops_the_rest(stack: Stack) -> None:
    # The profile's collector with a zero base rate, a short decision wait, and a slow-task threshold under
    # the example's slow task (build_report sleeps 0.3 s).
    slow_us = 290_000
    sampling = Collector(
        stack.binaries,
        stack.logs,
        stack.jaeger_otlp,
        overlays=(CONFIG / "otel-collector.tail-sampling.yaml",),
        env={
            "TAIL_SAMPLING_PERCENTAGE": "0",
            "TAIL_SAMPLING_DECISION_WAIT": "2s",
            "TAIL_SAMPLING_SLOW_TASK_MS": str(slow_us // 1000),
        },
        name="otelcol-tail-sampling",
    )
    service = new_service("sampled")
    signups = 4
    try:
        sampling.start()
        with compose_app(sampling, service, stack.logs) as server:
            send(server, "POST /signup", "POST /order", "POST /signup", "GET /blocking", "POST /signup", "GET /report")
            send(server, "POST /signup")
        kept = {"POST /order": 2, "GET /blocking": 1, "GET /report": 1}

        def arrived() -> dict[str, JaegerTrace] | None:
            found = traces_by_route(stack, service)
            done = {route: t for route, tasks in kept.items() for t in found.get(route, []) if complete(t, tasks)}
            return done if len(done) == len(kept) else None

        found = wait_for("the kept traces in Jaeger", arrived, WAIT_SECONDS, sampling.program, *stack.programs)
        time.sleep(2.5)  # one more decision wait: nothing is pending any more
        # Each kept whole, each by another policy: failed and skipped, blocked the loop, slow.
        assert [s.tags["background_task.outcome"] for s in task_spans(found["POST /order"])] == ["error", "skipped"]
        (resize,) = task_spans(found["GET /blocking"])
        assert (
            resize.events_named("background_task.event_loop_blocked")
            and resize.tags["background_task.outcome"] == "success"
        )
        (report,) = task_spans(found["GET /report"])
        assert report.tags["background_task.outcome"] == "success" and report.duration_us >= slow_us
        assert not report.events_named("background_task.event_loop_blocked")  # a def task: it runs in a thread
        # The /signup traces (two tasks that succeed, 20 ms and 10 ms) are dropped at a zero base rate, and
        # so is the readiness probe's GET /docs. On a loaded machine a 20 ms task can take longer than the
        # threshold: such a trace is rightly kept, as slow.
        routes = traces_by_route(stack, service)
        assert set(routes) - {"POST /signup"} == set(kept), {route: len(traces) for route, traces in routes.items()}
        kept_signups = routes.get("POST /signup", [])
        assert len(kept_signups) < signups, "no /signup trace was dropped"
        for trace in kept_signups:
            assert max(span.duration_us for span in task_spans(trace)) >= slow_us, trace.describe()
        # The span metrics still counted every span, the dropped ones too.
        calls = re.compile(
            rf'^traces_span_metrics_calls_total{{[^}}]*service_name="{service}"[^}}]*'
            rf'span_name="BackgroundTask send_welcome_email"[^}}]*}} (\S+)$',
            re.MULTILINE,
        )
        counted = lambda: [float(count) for count in calls.findall(sampling.metrics_text())] == [signups]  # noqa: E731
        wait_for("every /signup task in the span metrics", counted, WAIT_SECONDS, sampling.program)
    finally:
        sampling.program.stop()


# -- 5. Faults: the Collector restarted under traffic -----------------------------------------------


def test_collector_restart_mid_traffic_goes_unnoticed_and_spans_after_it_arrive(stack: Stack) -> None:
    service = new_service("restart")
    latencies: list[float] = []
    restarted_at_us = 0
    with compose_app(stack.collector, service, stack.logs, OTEL_EXPORTER_OTLP_TIMEOUT="2000") as server:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=10, limits=limits) as client:

            def requests(count: int) -> None:
                for _ in range(count):
                    start = time.monotonic()
                    response = client.post("/signup")
                    latencies.append(time.monotonic() - start)
                    assert response.status_code == 200 and response.json() == {"status": "welcome"}
                    time.sleep(0.05)

            requests(10)
            stack.collector.program.stop()  # SIGTERM: the Collector drains and exits
            requests(20)  # meanwhile every export fails
            stack.collector.start()
            restarted_at_us = int(time.time() * 1_000_000)
            requests(10)
            output = server.output()
    # The app never noticed: every request answered at once, the tasks ran, the server stopped cleanly.
    assert len(latencies) == 40 and max(latencies) < 1.0, latencies
    # No error from the app or from otel_bgtasks; the SDK's exporter logs each failed export (with a traceback
    # in older SDKs), which is all the outage shows.
    assert "Exception in ASGI application" not in output and "/otel_bgtasks/" not in output, output

    def after_restart() -> list[JaegerTrace] | None:
        traces = [
            t
            for t in traces_by_route(stack, service).get("POST /signup", [])
            if (r := t.request()) is not None and r.start_us > restarted_at_us and complete(t, 2)
        ]
        return traces if len(traces) == 10 else None

    traces = wait_for("the ten traces sent after the restart", after_restart, WAIT_SECONDS, *stack.programs)
    for trace in traces:
        welcome, newsletter = task_spans(trace)
        assert_task_span(welcome, "send_welcome_email", "success", "threadpool")
        assert_task_span(newsletter, "add_to_newsletter", "success", "async")
    # The counters are cumulative: after the restart the Collector gets the whole count again.
    count = f'background_task_outcomes_total{{job="{service}", code_function_name="{DEMO}.send_welcome_email"}} == 40'
    wait_for("all 40 tasks counted in Prometheus", lambda: stack.promql(count), WAIT_SECONDS, *stack.programs)
