"""End to end over real OTLP/HTTP: the example app in a uvicorn subprocess, configured only through ``OTEL_*``.

No Docker and no collector: the test itself is the OTLP receiver, an ``http.server`` on 127.0.0.1 that
accepts ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` (gzip or not) and decodes them with the
protobuf classes of ``opentelemetry-proto``. The app, ``examples/fastapi_app.py`` unchanged, runs in a
real uvicorn server in a subprocess whose environment has no ``OTEL_*`` variable but the ones each test
sets: the OTLP/HTTP exporter's endpoint and protocol, the exporters, the service name. The test sends
``POST /order``, ``POST /signup`` and ``GET /sync-route``, stops the server with SIGINT (the Dockerfile's
STOPSIGNAL: uvicorn's graceful shutdown waits for the background tasks, then re-raises the signal it
got; a re-raised SIGINT is a KeyboardInterrupt and the SDK flushes at exit, while a re-raised SIGTERM
would kill the process before that), and checks the span trees that arrived.

Two ways to start it:

- ``test_example_app_exports_task_trees_over_otlp``: the SDK set up from the environment, and nothing
  else. The example takes the global tracer provider, so something must build one from ``OTEL_*``
  before it is imported. ``opentelemetry.distro.OpenTelemetryConfigurator().configure()`` is exactly
  the step of ``opentelemetry-instrument`` that does that (the distro's public configurator, the one its
  ``opentelemetry_configurator`` entry point names), minus loading any instrumentor; then
  ``uvicorn.main()``. The SDK's own ``_initialize_components`` would do the same but is private; a
  hand-written ``TracerProvider`` setup would not be "configured only through OTEL_* variables". So every
  span here comes from the app's own ``otel_bgtasks.instrument(app)`` and from what that turns on
  (FastAPI's native telemetry, active because the global provider is an SDK one, or on a FastAPI without
  it the ASGI middleware otel_bgtasks adds). Metrics are exported too, gzipped, as in the compose stack.
- ``test_example_app_under_opentelemetry_instrument``: plain ``opentelemetry-instrument uvicorn
  examples.fastapi_app:app``, which also loads every installed instrumentor:
  opentelemetry-instrumentation-fastapi for the request spans and otel_bgtasks's own ``background_tasks``
  entry point. The task spans must be the same, and there must still be one per task.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_SECONDS = 20  # import of FastAPI, SQLAlchemy and the SDK, on 2 busy cores
STOP_SECONDS = 15
REQUEST_SECONDS = 5

# The SDK set up from OTEL_* (opentelemetry-distro's configurator), then uvicorn's own command line.
SDK_FROM_ENV_THEN_UVICORN = (
    "from opentelemetry.distro import OpenTelemetryConfigurator\n"
    "OpenTelemetryConfigurator().configure()\n"
    "import uvicorn\n"
    "uvicorn.main()\n"
)
APP = "examples.fastapi_app:app"
DEMO = "otel_bgtasks.cli.demo_app"


# -- The OTLP/HTTP receiver -------------------------------------------------------------------------


ROUTES: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}


@dataclass
class Received:
    """Every export request the receiver decoded, per path, and what it refused."""

    requests: dict[str, list[Any]] = field(default_factory=lambda: {path: [] for path in ROUTES})
    encodings: set[str] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class OtlpHandler(BaseHTTPRequestHandler):
    """OTLP/HTTP with binary protobuf, as the SDK's ``http/protobuf`` exporters send it."""

    server: OtlpServer

    def do_POST(self) -> None:
        received = self.server.received
        routes = ROUTES.get(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "identity")
        problem = None
        if routes is None:
            problem = f"no such path: {self.path}"
        elif self.headers.get("Content-Type") != "application/x-protobuf":
            problem = f"content type {self.headers.get('Content-Type')!r}"
        elif encoding not in ("identity", "gzip"):
            problem = f"content encoding {encoding!r}"
        if problem is None and routes is not None:
            request_type, response_type = routes
            try:
                message = request_type.FromString(gzip.decompress(body) if encoding == "gzip" else body)
            except (DecodeError, OSError) as exc:
                problem = f"undecodable {self.path} body: {exc}"
            else:
                with received.lock:
                    received.requests[self.path].append(message)
                    received.encodings.add(encoding)
                self._answer(200, response_type().SerializeToString())
                return
        with received.lock:
            received.refused.append(problem or "?")
        self._answer(400, b"")

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the assertions say what arrived."""


class OtlpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OtlpHandler)
        self.received = Received()


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver on 127.0.0.1; yields its base URL (what OTEL_EXPORTER_OTLP_ENDPOINT takes)."""
    server = OtlpServer()
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}", server.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(STOP_SECONDS)


# -- Decoded spans ----------------------------------------------------------------------------------


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        result[pair.key] = any_value(pair.value)
    return result


@dataclass(frozen=True)
class Span:
    name: str
    scope: str
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: int
    status: int
    status_message: str
    start: int
    end: int
    attributes: Mapping[str, Any]
    events: tuple[tuple[str, Mapping[str, Any]], ...]
    resource: Mapping[str, Any]

    @classmethod
    def decode(cls, span: SpanProto, scope: str, resource: Mapping[str, Any]) -> Span:
        return cls(
            name=span.name,
            scope=scope,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex() or None,
            kind=span.kind,
            status=span.status.code,
            status_message=span.status.message,
            start=span.start_time_unix_nano,
            end=span.end_time_unix_nano,
            attributes=attributes(span.attributes),
            events=tuple((event.name, attributes(event.attributes)) for event in span.events),
            resource=resource,
        )

    def events_named(self, name: str) -> list[Mapping[str, Any]]:
        return [attrs for event_name, attrs in self.events if event_name == name]


def decoded_spans(received: Received) -> list[Span]:
    spans = []
    for request in received.requests["/v1/traces"]:
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                spans.extend(Span.decode(s, scope_spans.scope.name, resource) for s in scope_spans.spans)
    return spans


def render(spans: list[Span]) -> str:
    """The span trees, indented, for assertion messages."""
    children: dict[str | None, list[Span]] = {}
    ids = {span.span_id for span in spans}
    for span in spans:
        children.setdefault(span.parent_id if span.parent_id in ids else None, []).append(span)
    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        outcome = span.attributes.get("background_task.outcome", "")
        lines.append(f"{'  ' * depth}{span.name} [{span.scope}] status={span.status} {outcome}".rstrip())
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start):
            walk(child, depth + 1)

    for root in sorted(children.get(None, []), key=lambda s: s.start):
        walk(root, 0)
    return "\n".join(lines)


# -- The app in a subprocess ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def otel_environment(endpoint: str, **variables: str) -> dict[str, str]:
    """This process's environment minus every OTEL_* (and FastAPI telemetry) variable, plus ``variables``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    # The virtualenv's scripts (opentelemetry-instrument, uvicorn) first, whether or not it is activated.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_LOGS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="100",
        **variables,
    )
    return env


@dataclass
class Server:
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(command: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """Run ``command`` plus ``--host 127.0.0.1 --port N`` from the repository root until it answers.

    On a clean exit of the block, stop it with SIGINT and wait for it; in every case, kill it if it
    is still running.
    """
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}", log)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{server.output()}"
            assert time.monotonic() < deadline, f"the server did not answer in {START_SECONDS}s:\n{server.output()}"
            try:
                if httpx.get(f"{server.url}/docs", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield server
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not stop in {STOP_SECONDS}s:\n{server.output()}") from None
        assert returncode == 0, f"the server exited with {returncode}:\n{server.output()}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_SECONDS)


def send_requests(url: str) -> None:
    # A new connection per request: uvicorn closes the one whose app raised, and /order's task raises
    # after its response (Starlette re-raises a task's exception), racing a keep-alive client's next request.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=REQUEST_SECONDS, limits=limits) as client:
        for method, path in (("POST", "/order"), ("POST", "/signup"), ("GET", "/sync-route")):
            response = client.request(method, path)
            # /order too: its task fails after the response, so the client is told all went well.
            assert response.status_code == 200, (method, path, response.text)


# -- What must arrive -------------------------------------------------------------------------------

SPAN_KIND_INTERNAL = SpanProto.SpanKind.SPAN_KIND_INTERNAL
SPAN_KIND_SERVER = SpanProto.SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = Status.StatusCode.STATUS_CODE_ERROR


class Trees:
    """The decoded spans, by id, with the request span of each route."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans = spans
        self.by_id = {span.span_id: span for span in spans}
        self.text = render(spans)
        assert len(self.by_id) == len(spans), f"a span arrived twice:\n{self.text}"

    def request(self, route: str) -> Span:
        """The SERVER span of the one request to ``route`` (a path without parameters).

        By ``http.route`` where the request spans' source sets it (FastAPI's native telemetry, contrib's
        FastAPI instrumentation), else by path (the plain ASGI middleware, on FastAPI without telemetry).
        """
        keys = ("http.route", "url.path", "http.target")
        matches = [s for s in self.spans if s.kind == SPAN_KIND_SERVER and route in (s.attributes.get(k) for k in keys)]
        assert len(matches) == 1, f"{len(matches)} request spans for {route}:\n{self.text}"
        return matches[0]

    def tasks_of(self, request: Span) -> list[Span]:
        """The task spans in the request's trace, in start order; each must hang below the request span."""
        tasks = sorted(
            (s for s in self.spans if s.trace_id == request.trace_id and s.name.startswith("BackgroundTask ")),
            key=lambda s: (s.start, s.attributes.get("background_task.index", 0)),
        )
        for task in tasks:
            assert self.ancestors(task)[-1] is request, f"{task.name} is not below {request.name}:\n{self.text}"
        return tasks

    def parent(self, span: Span) -> Span:
        assert span.parent_id is not None, f"{span.name} has no parent:\n{self.text}"
        assert span.parent_id in self.by_id, f"the parent of {span.name} never arrived:\n{self.text}"
        return self.by_id[span.parent_id]

    def ancestors(self, span: Span) -> list[Span]:
        """Parent, grandparent, ... up to the trace's root, all of which arrived, all in the same trace."""
        chain = []
        while span.parent_id is not None:
            span = self.parent(span)
            chain.append(span)
        for ancestor in chain:
            assert ancestor.trace_id == span.trace_id
        return chain


def assert_task_trees(received: Received, service_name: str, server: Server) -> Trees:
    assert received.refused == [], received.refused
    assert received.requests["/v1/traces"], f"no trace export arrived:\n{server.output()}"
    assert "Failed to export" not in server.output(), server.output()
    spans = decoded_spans(received)
    trees = Trees(spans)
    assert {span.resource.get("service.name") for span in spans} == {service_name}
    assert {span.resource.get("telemetry.sdk.language") for span in spans} == {"python"}
    # One span per task execution: no second span from FastAPI's native telemetry or from contrib.
    assert not [s for s in spans if s.name == "fastapi.background_task"], trees.text
    for task in (s for s in spans if s.name.startswith("BackgroundTask ")):
        assert task.kind == SPAN_KIND_INTERNAL, task
        assert task.attributes["code.function.name"] == f"{DEMO}.{task.name.removeprefix('BackgroundTask ')}"
        assert task.attributes["code.file.path"].endswith(os.path.join("otel_bgtasks", "cli", "demo_app.py"))

    # POST /order: charge_card fails after the response; send_receipt, queued after it, is skipped.
    order = trees.request("/order")
    charge, receipt = trees.tasks_of(order)
    assert (charge.name, receipt.name) == ("BackgroundTask charge_card", "BackgroundTask send_receipt"), trees.text
    assert charge.attributes["background_task.outcome"] == "error"
    assert charge.attributes["background_task.execution"] == "threadpool"
    assert charge.attributes["background_task.index"] == 0
    assert charge.attributes["error.type"] == f"{DEMO}.PaymentDeclinedError"
    assert charge.status == STATUS_ERROR
    assert "card declined" in charge.status_message
    (exception,) = charge.events_named("exception")
    assert "PaymentDeclinedError" in exception["exception.type"]
    assert "card declined" in exception["exception.message"]
    assert "charge_card" in exception["exception.stacktrace"]
    assert receipt.attributes["background_task.outcome"] == "skipped"
    assert receipt.attributes["background_task.index"] == 1
    assert receipt.status != STATUS_ERROR
    assert receipt.start == receipt.end, "a skipped task's span has no length"
    assert receipt.start >= charge.end
    # Both are children of the span current in the route when they were queued, in the request's trace.
    creator = trees.parent(charge)
    assert trees.parent(receipt) is creator
    assert creator is order or order in trees.ancestors(creator)
    assert creator.events_named("background_task.enqueued") == []  # child mode: the parent says it
    # The request itself went well.
    assert order.status != STATUS_ERROR
    assert 200 in (order.attributes.get("http.response.status_code"), order.attributes.get("http.status_code"))

    # POST /signup: two tasks that succeed, one in the thread pool, one on the event loop.
    signup = trees.request("/signup")
    email, newsletter = trees.tasks_of(signup)
    assert email.name == "BackgroundTask send_welcome_email", trees.text
    assert newsletter.name == "BackgroundTask add_to_newsletter", trees.text
    for task, execution in ((email, "threadpool"), (newsletter, "async")):
        assert task.attributes["background_task.outcome"] == "success"
        assert task.attributes["background_task.execution"] == execution
        assert task.status != STATUS_ERROR
        assert task.events_named("exception") == []
    assert trees.parent(email) is trees.parent(newsletter)

    # GET /sync-route: a def route queues its task inside its own span, which becomes the task's parent.
    sync_route = trees.request("/sync-route")
    (upload,) = trees.tasks_of(sync_route)
    assert upload.name == "BackgroundTask upload_export", trees.text
    assert upload.attributes["background_task.outcome"] == "success"
    prepare = trees.parent(upload)
    assert prepare.name == "prepare export", trees.text
    assert sync_route in trees.ancestors(prepare)
    assert prepare.events_named("background_task.enqueued") == []
    return trees


def metric_points(received: Received, name: str) -> list[dict[str, Any]]:
    """The attributes of every data point of metric ``name``, whatever its type, in every export."""
    points: list[dict[str, Any]] = []
    for request in received.requests["/v1/metrics"]:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        data = getattr(metric, metric.WhichOneof("data"))
                        points.extend(attributes(point.attributes) for point in data.data_points)
    return points


# -- The tests --------------------------------------------------------------------------------------


def test_example_app_exports_task_trees_over_otlp(tmp_path: Path) -> None:
    service_name = "otel-bgtasks-e2e-sdk"
    with otlp_receiver() as (endpoint, received):
        env = otel_environment(
            endpoint,
            OTEL_SERVICE_NAME=service_name,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
        )
        command = [sys.executable, "-c", SDK_FROM_ENV_THEN_UVICORN, APP]
        with serving(command, env, tmp_path / "server.log") as server:
            send_requests(server.url)

    trees = assert_task_trees(received, service_name, server)
    assert received.encodings == {"gzip"}
    # Not auto-instrumented: opentelemetry-instrument would have added this resource attribute.
    assert all("telemetry.auto.version" not in span.resource for span in trees.spans)

    # The app's own metrics arrived too, flushed at shutdown like the spans.
    durations = metric_points(received, "background_task.duration")
    failed = {
        "code.function.name": f"{DEMO}.charge_card",
        "background_task.execution": "threadpool",
        "background_task.outcome": "error",
        "error.type": f"{DEMO}.PaymentDeclinedError",
    }
    assert failed in durations, durations
    outcomes = metric_points(received, "background_task.outcomes")
    skipped = {
        "code.function.name": f"{DEMO}.send_receipt",
        "background_task.execution": "threadpool",
        "background_task.outcome": "skipped",
    }
    assert skipped in outcomes, outcomes


def test_example_app_under_opentelemetry_instrument(tmp_path: Path) -> None:
    service_name = "otel-bgtasks-e2e-auto"
    with otlp_receiver() as (endpoint, received):
        env = otel_environment(endpoint, OTEL_SERVICE_NAME=service_name, OTEL_METRICS_EXPORTER="none")
        # Exactly what a user types; PATH finds the virtualenv's scripts.
        command = ["opentelemetry-instrument", "uvicorn", APP]
        with serving(command, env, tmp_path / "server.log") as server:
            send_requests(server.url)

    trees = assert_task_trees(received, service_name, server)
    assert received.encodings == {"identity"}
    assert received.requests["/v1/metrics"] == []
    # Auto-instrumented: opentelemetry-instrument's resource attribute is there.
    assert all("telemetry.auto.version" in span.resource for span in trees.spans)
