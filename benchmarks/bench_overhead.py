"""Per-task cost of otel_bgtasks and its peers, in units of one bare SDK span, measured side by side in one run.

    python benchmarks/bench_overhead.py                  # times, about a minute
    python benchmarks/bench_overhead.py --instructions   # instruction counts under callgrind, 4-8 minutes
    python benchmarks/bench_overhead.py --breakdown      # the same, and where the cost goes, 6-12 minutes
    python benchmarks/bench_overhead.py --quick ...      # fewer iterations, for a smoke run

The unit is one bare span, ``tracer.start_span("x").end()``, on an SDK ``TracerProvider`` with a
``SimpleSpanProcessor`` to an exporter that drops everything, with a sampled request span current as
when a task's span starts. The workload is one request: start a
request span and make it current, add 5 async no-op tasks to a ``BackgroundTasks``, end the request
span, run the tasks (as Starlette does after the response, still inside the request's context), with a
real SDK ``MeterProvider`` whose ``InMemoryMetricReader`` is never collected during the run. Each arm
runs the same workload:

    extra cost per task = (arm - its baseline) / 5, in instructions or seconds; divided by the unit

Instruction counts (``--instructions``) come from valgrind's callgrind, one process per arm, and repeat
almost exactly from run to run; see callgrind.py for how the regions are marked. Times (the default)
are CPU times in one process and one event loop, the arms alternating round after round, medians over
rounds, so that a noisy neighbour hits every arm alike; read their ratios, never the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import callgrind  # benchmarks/callgrind.py, next to this script
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, NoOpTracerProvider, SpanContext, SpanKind, TraceFlags
from starlette.background import BackgroundTasks

import otel_bgtasks
from otel_bgtasks import semconv

TASKS = 5  # per request
TARGETS = {"bgtasks": 2.4, "bgtasks_unsampled": 1.0}  # bare spans per task, issue 12


class DropExporter(SpanExporter):
    """Exports nowhere: the cost measured is the instrumentation's and the SDK's, not a network's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@dataclass(frozen=True)
class Providers:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    reader: InMemoryMetricReader


def make_providers(exporter: SpanExporter) -> Providers:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return Providers(tracer_provider, MeterProvider([reader]), reader)


async def noop_async() -> None:
    pass


def noop_sync() -> None:
    pass


# An upstream service that said "do not sample": the request span is valid but not recording.
UNSAMPLED = trace.set_span_in_context(
    NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT)))
)

Runner = Callable[[int], Awaitable[None]]
"""Runs the arm's workload n times."""


def requests(
    providers: Providers,
    tasks_class: type[BackgroundTasks] = BackgroundTasks,
    func: Callable[[], Any] = noop_async,
    parent: Context | None = None,
    request_context: Callable[[Context], Context] | None = None,
) -> Runner:
    """The workload: n requests of ``TASKS`` tasks each, the request span current when they are added and run."""
    tracer = providers.tracer_provider.get_tracer("bench.request")
    parent = Context() if parent is None else parent

    async def run(n: int) -> None:
        for _ in range(n):
            span = tracer.start_span("GET /", parent, SpanKind.SERVER)
            current = trace.set_span_in_context(span, parent)
            if request_context is not None:
                current = request_context(current)
            token = context.attach(current)
            tasks = tasks_class()
            for _ in range(TASKS):
                tasks.add_task(func)
            span.end()
            await tasks()
            context.detach(token)

    return run


def bare_spans(providers: Providers, in_request: bool) -> Runner:
    """The unit: ``start_span("x").end()`` with a sampled request span current, as when a task span starts.

    Without one (``in_request=False``) each span is a root span, about 10 % cheaper: no parent to look
    up, a new trace id instead.
    """
    tracer = providers.tracer_provider.get_tracer("bench")

    async def run(n: int) -> None:
        request = tracer.start_span("GET /", kind=SpanKind.SERVER) if in_request else None
        token = context.attach(trace.set_span_in_context(request)) if request is not None else None
        for _ in range(n):
            tracer.start_span("x").end()
        if request is not None and token is not None:
            context.detach(token)
            request.end()

    return run


Removal = Callable[[], None]
Install = Callable[[Providers], tuple[Runner, Removal]]


def nothing() -> None:
    pass


def plain(**workload: Any) -> Install:
    return lambda providers: (requests(providers, **workload), nothing)


def unit(in_request: bool) -> Install:
    return lambda providers: (bare_spans(providers, in_request), nothing)


def bgtasks(workload: dict[str, Any] | None = None, tracer: bool = True, meter: bool = True, **options: Any) -> Install:
    """otel_bgtasks.instrument() with ``options``; a provider left out is replaced by the API's no-op."""

    def install(providers: Providers) -> tuple[Runner, Removal]:
        otel_bgtasks.uninstrument()
        otel_bgtasks.instrument(
            tracer_provider=providers.tracer_provider if tracer else NoOpTracerProvider(),
            meter_provider=providers.meter_provider if meter else NoOpMeterProvider(),
            **options,
        )
        return requests(providers, **(workload or {})), otel_bgtasks.uninstrument

    return install


def contrib(providers: Providers) -> tuple[Runner, Removal]:
    """opentelemetry-instrumentation-fastapi alone: its patch of ``BackgroundTask.__call__`` opens a bare span."""
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app = FastAPI()  # a throwaway: instrument_app patches BackgroundTask for every app
    FastAPIInstrumentor.instrument_app(app, tracer_provider=providers.tracer_provider)
    return requests(providers), lambda: FastAPIInstrumentor.uninstrument_app(app)


def native(operation_spans: bool) -> Install:
    """FastAPI >= 0.163's ``BackgroundTasks``, which opens a ``fastapi.background_task`` span per task.

    It does so only inside a request that FastAPI's telemetry middleware handles: the middleware puts
    a ``_RequestTelemetry`` in the OpenTelemetry context, with a tracer if ``operation_spans`` is on.
    Setting that context value is all the middleware does that the task span depends on, and it keeps
    the request's own cost (routing, the middleware, its request span) out of the figure.
    """

    def install(providers: Providers) -> tuple[Runner, Removal]:
        from fastapi import BackgroundTasks as FastAPIBackgroundTasks
        from fastapi.telemetry._api import (  # pyright: ignore[reportMissingImports]
            _REQUEST_TELEMETRY_KEY,  # pyright: ignore[reportPrivateUsage]
            _RequestTelemetry,  # pyright: ignore[reportPrivateUsage]
        )

        tracer = providers.tracer_provider.get_tracer("fastapi") if operation_spans else None
        telemetry = _RequestTelemetry(span=None, span_method="GET", tracer=tracer)

        def with_telemetry(current: Context) -> Context:
            return context.set_value(_REQUEST_TELEMETRY_KEY, telemetry, current)

        return requests(providers, FastAPIBackgroundTasks, request_context=with_telemetry), nothing

    return install


def native_available() -> bool:
    try:
        import fastapi.telemetry._api  # noqa: F401  # pyright: ignore[reportMissingImports, reportUnusedImport]
    except ImportError:
        return False
    return True


# -- per request: contrib's ASGI middleware, request metrics that end with the response on or off ---------

HTTP_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 80),
}


def asgi_requests(providers: Providers, tasks: int, probe: Callable[[], Any] | None = None) -> Runner:
    """n requests through contrib's ``OpenTelemetryMiddleware`` to an app that answers, then runs ``tasks`` tasks.

    The app answers with a Starlette ``Response`` whose ``background=`` holds the tasks: the response, then
    the tasks, and only a task a Starlette response runs ends the request's metrics (request_metrics
    looks for the response's ``__call__`` among the task's callers). ``probe``, a last task, for the check.
    The middleware is made after ``instrument()``, as an app's is when it starts serving.
    """
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.responses import Response

    async def app(scope: Any, receive: Any, send: Any) -> None:
        background = BackgroundTasks()
        for _ in range(tasks):
            background.add_task(noop_async)
        if probe is not None:
            background.add_task(probe)
        await Response(b"ok", background=background)(scope, receive, send)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    middleware = OpenTelemetryMiddleware(
        app, tracer_provider=providers.tracer_provider, meter_provider=providers.meter_provider
    )

    async def run(n: int) -> None:
        for _ in range(n):
            await middleware(dict(HTTP_SCOPE), receive, send)

    run.middleware = middleware  # type: ignore[attr-defined]  # for check_request()
    return run


def asgi_request(
    end_at_response: bool, tasks: int = 0, contrib_sdk: bool = False, probe: Callable[[], Any] | None = None
) -> Install:
    """otel_bgtasks defaults, ``request_metrics_end_at_response`` as given; requests through contrib's middleware.

    Contrib's middleware gets the API's no-op tracer and meter unless ``contrib_sdk``: the feature's own
    work is the same either way (it hands contrib's calls on to whatever instruments contrib has), and on
    the SDK the request's own cost varies by about 2 k instructions from one region to the next, as much
    as the figure measured. Task spans, if any, go to the SDK.
    """

    def install(providers: Providers) -> tuple[Runner, Removal]:
        otel_bgtasks.uninstrument()
        otel_bgtasks.instrument(
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
            request_metrics_end_at_response=end_at_response,
        )
        contrib = providers if contrib_sdk else Providers(NoOpTracerProvider(), NoOpMeterProvider(), providers.reader)
        return asgi_requests(contrib, tasks, probe), otel_bgtasks.uninstrument

    return install


@dataclass(frozen=True)
class Arm:
    label: str
    install: Install
    baseline: str | None = "plain"  # the arm subtracted; None: an arm shown as measured
    # What one iteration exports, checked before the arm is measured: the request span, other spans
    # (children of the request span unless not parented), task durations in background_task.duration.
    request_span: bool = True
    task_spans: int = 0
    parented: bool = True
    task_metrics: bool = False
    per: int = TASKS  # units of work per iteration
    per_request: bool = False  # one iteration is one request through contrib's middleware: figures per request


def traced(label: str, install: Install, baseline: str = "plain", **kwargs: Any) -> Arm:
    """An arm that exports a span and (unless told otherwise) a task duration per task."""
    return Arm(label, install, baseline, **{"task_spans": TASKS, "task_metrics": True, **kwargs})


ARMS: dict[str, Arm] = {
    "unit": Arm("bare span, a request span current (the unit)", unit(True), None, task_spans=1, per=1),
    "unit_root": Arm(
        "bare span, no span current: a root span", unit(False), None, request_span=False, task_spans=1, per=1
    ),
    "plain": Arm("uninstrumented (Starlette BackgroundTasks)", plain(), None),
    "plain_unsampled": Arm("uninstrumented, request not sampled", plain(parent=UNSAMPLED), None, request_span=False),
    "bgtasks": traced("otel_bgtasks defaults", bgtasks()),
    "bgtasks_unsampled": traced(
        "otel_bgtasks, request not sampled",
        bgtasks({"parent": UNSAMPLED}),
        "plain_unsampled",
        request_span=False,
        task_spans=0,
    ),
    "contrib": traced("opentelemetry-instrumentation-fastapi's task span", contrib, task_metrics=False),
    "native_off": Arm("fastapi.BackgroundTasks, operation spans off", native(False)),
    "native": traced("FastAPI native fastapi.background_task", native(True), "native_off", task_metrics=False),
    # Where the default's cost goes, and the options it does not use.
    "bgtasks_no_meter": traced("otel_bgtasks, no-op meter", bgtasks(meter=False), task_metrics=False),
    "bgtasks_no_tracer": traced("otel_bgtasks, no-op tracer", bgtasks(tracer=False), task_spans=0),
    "bgtasks_no_providers": Arm("otel_bgtasks, no-op tracer and meter", bgtasks(tracer=False, meter=False)),
    "bgtasks_no_timer": traced("otel_bgtasks, blocking timer off", bgtasks(blocking_threshold=None)),
    "bgtasks_link": traced("otel_bgtasks, link mode", bgtasks(mode="link"), parented=False),
    "bgtasks_everything": traced(
        "otel_bgtasks, every option on",
        bgtasks(capture_args=True, timeout=60, continue_on_error=True, sentry=False),
    ),
    "plain_def": Arm("uninstrumented, def tasks", plain(func=noop_sync), None),
    "bgtasks_def": traced("otel_bgtasks defaults, def tasks", bgtasks({"func": noop_sync}), "plain_def"),
    # Per request, through contrib's ASGI middleware: what request_metrics_end_at_response adds.
    "request_off": Arm("request, no task: end_at_response off", asgi_request(False), None, per=1, per_request=True),
    "request": Arm("request, no task: end_at_response on", asgi_request(True), "request_off", per=1, per_request=True),
    "request_task_off": Arm(
        "request, 1 task: end_at_response off", asgi_request(False, 1), None, task_spans=1, per=1, per_request=True
    ),
    "request_task": Arm(
        "request, 1 task: end_at_response on",
        asgi_request(True, 1),
        "request_task_off",
        task_spans=1,
        per=1,
        per_request=True,
    ),
    "request_sdk_off": Arm(
        "request, no task, contrib on the SDK: off", asgi_request(False, 0, True), None, per=1, per_request=True
    ),
    "request_sdk": Arm(
        "request, no task, contrib on the SDK: on",
        asgi_request(True, 0, True),
        "request_sdk_off",
        per=1,
        per_request=True,
    ),
}
REQUEST_TARGETS = {"request": 6000}  # instructions per request the feature may add to a request with no task

# In --breakdown (and always in the time mode): where the default's cost goes, and more options.
BREAKDOWN_ONLY = frozenset(
    {
        "bgtasks_no_meter",
        "bgtasks_no_tracer",
        "bgtasks_no_providers",
        "bgtasks_no_timer",
        "bgtasks_link",
        "bgtasks_everything",
        "plain_def",
        "bgtasks_def",
    }
)


def selected_arms(breakdown: bool, only: str | None) -> list[str]:
    names = [name for name in ARMS if breakdown or name not in BREAKDOWN_ONLY]
    if not native_available():
        names = [name for name in names if not name.startswith("native")]
    if only:
        wanted = {name.strip() for name in only.split(",")}
        unknown = wanted - set(ARMS)
        if unknown:
            raise SystemExit(f"--only: unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
        # An arm needs its baseline, and every figure needs the unit.
        wanted |= {ARMS[name].baseline for name in wanted if ARMS[name].baseline} | {"unit"}
        names = [name for name in ARMS if name in wanted]
    return names


# -- the check: each arm did the work it claims ----------------------------------------------------


def check(name: str) -> list[ReadableSpan]:
    """Run one iteration of ``name`` on in-memory exporters, fail loudly if its spans or metrics are off.

    Returns the task spans.
    """
    arm = ARMS[name]
    if arm.per_request:
        check_request(name)
        return []
    exporter = InMemorySpanExporter()
    providers = make_providers(exporter)
    run, remove = arm.install(providers)
    try:
        asyncio.run(run(1))
    finally:
        remove()
    spans = exporter.get_finished_spans()
    problems = []
    requests_ = [span for span in spans if span.name == "GET /"]
    tasks = [span for span in spans if span.name != "GET /"]
    if len(requests_) != int(arm.request_span):
        problems.append(f"expected {int(arm.request_span)} request span, got {len(requests_)}")
    if len(tasks) != arm.task_spans:
        problems.append(f"expected {arm.task_spans} task spans, got {[span.name for span in tasks]}")
    if requests_ and arm.parented:
        request_id = requests_[0].context.span_id
        orphans = [span.name for span in tasks if span.parent is None or span.parent.span_id != request_id]
        if orphans:
            problems.append(f"task spans not children of the request span: {orphans}")
    counted = duration_count(providers.reader)
    if counted != (TASKS if arm.task_metrics else 0):
        problems.append(f"expected {TASKS if arm.task_metrics else 0} task durations, got {counted}")
    if problems:
        raise SystemExit(f"arm {name!r} does not measure what it says: " + "; ".join(problems))
    return tasks


def active_requests(reader: InMemoryMetricReader) -> float:
    """Contrib's http.server.active_requests, summed over its points, as the reader collects it now."""
    data = reader.get_metrics_data()
    return sum(
        point.value  # pyright: ignore[reportAttributeAccessIssue]
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "http.server.active_requests"
        for point in metric.data.data_points
    )


def check_request(name: str) -> None:
    """A request arm: contrib recorded one duration and the active count is back to 0, each task has its span,
    and the middleware's instruments are otel_bgtasks' proxies exactly when the option is on."""
    arm = ARMS[name]
    exporter = InMemorySpanExporter()
    providers = make_providers(exporter)
    run, remove = arm.install(providers)
    remove()
    on = arm.baseline is not None
    # While a last task runs, the request is off the active count when the option is on, and still on it off.
    active_during: list[float] = []

    def probe() -> None:
        active_during.append(active_requests(providers.reader))

    # The same request, contrib's middleware on the SDK: what it recorded is what is checked.
    run, remove = asgi_request(on, arm.task_spans, contrib_sdk=True, probe=probe if arm.task_spans else None)(providers)
    try:
        asyncio.run(run(1))
        counter = type(run.middleware.active_requests_counter)  # type: ignore[attr-defined]
    finally:
        remove()
    problems = []
    proxied = counter.__module__ == "otel_bgtasks.request_metrics"
    if proxied != on:
        problems.append(f"the active-requests counter is a {counter.__qualname__}")
    tasks = [span for span in exporter.get_finished_spans() if semconv.CODE_FUNCTION_NAME in (span.attributes or {})]
    expected = arm.task_spans + (1 if arm.task_spans else 0)  # the probe's span too
    if len(tasks) != expected:
        problems.append(f"expected {expected} task spans, got {len(tasks)}")
    if arm.task_spans and active_during != [0 if on else 1]:
        problems.append(f"active requests while the last task ran: {active_during}, expected {[0 if on else 1]}")
    durations = active = 0
    data = providers.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points: Any = metric.data.data_points
                if metric.name in ("http.server.duration", "http.server.request.duration"):
                    durations += sum(point.count for point in points)
                elif metric.name == "http.server.active_requests":
                    active += sum(point.value for point in points)
    if durations < 1 or active != 0:
        problems.append(f"contrib recorded {durations} request durations, {active} requests still active")
    if problems:
        raise SystemExit(f"arm {name!r} does not measure what it says: " + "; ".join(problems))


def check_all(names: Sequence[str]) -> None:
    """Check every arm, and that the FastAPI native arm's task spans are those of a real FastAPI app."""
    for name in names:
        tasks = check(name)
        if name == "native":
            real = native_reference()
            if shapes(tasks) != shapes(real):
                raise SystemExit(
                    f"arm 'native' does not make the task spans a FastAPI app makes: {shapes(tasks)} != {shapes(real)}"
                )


def shapes(spans: Sequence[ReadableSpan]) -> list[tuple[str, SpanKind, dict[str, Any]]]:
    return [(span.name, span.kind, dict(span.attributes or {})) for span in spans]


def native_reference() -> list[ReadableSpan]:
    """The task spans of one request to a real FastAPI app with native telemetry, through httpx.ASGITransport."""
    import httpx
    from fastapi import BackgroundTasks as FastAPIBackgroundTasks
    from fastapi import FastAPI

    exporter = InMemorySpanExporter()
    providers = make_providers(exporter)
    app = FastAPI(telemetry={"tracer_provider": providers.tracer_provider, "meter_provider": providers.meter_provider})

    async def route(background_tasks: FastAPIBackgroundTasks) -> None:
        for _ in range(TASKS):
            background_tasks.add_task(noop_async)

    route.__annotations__["background_tasks"] = FastAPIBackgroundTasks  # not the string: FastAPI resolves it here
    app.get("/")(route)

    async def request() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            (await client.get("/")).raise_for_status()

    asyncio.run(request())
    return [span for span in exporter.get_finished_spans() if span.name == "fastapi.background_task"]


def duration_count(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        point.count
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == semconv.METRIC_DURATION
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    )


# -- SDK calls, each alone (--breakdown) -------------------------------------------------------------


def pieces(providers: Providers) -> dict[str, Runner]:
    """The SDK calls a task's telemetry is made of, each measured alone, with a sampled request span current.

    Span operations other than start and end are measured on a fresh span each time (an ended span
    ignores them): subtract the unit to read them.
    """
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

    tracer = providers.tracer_provider.get_tracer("bench.piece")
    request = tracer.start_span("GET /")
    current = trace.set_span_in_context(request)
    start_attributes = {
        semconv.CODE_FUNCTION_NAME: "app.tasks.send_welcome_email",
        semconv.CODE_FILE_PATH: "/srv/app/tasks.py",
        semconv.CODE_LINE_NUMBER: 42,
        semconv.EXECUTION: semconv.EXECUTION_ASYNC,
        semconv.INDEX: 0,
        semconv.QUEUE_DURATION: 0.000123,
    }
    end_attributes = {semconv.OUTCOME: semconv.OUTCOME_SUCCESS, semconv.BLOCKING_MAX: 0.000045}
    metric_attributes = {
        semconv.CODE_FUNCTION_NAME: "app.tasks.send_welcome_email",
        semconv.EXECUTION: semconv.EXECUTION_ASYNC,
        semconv.OUTCOME: semconv.OUTCOME_SUCCESS,
    }
    queue_attributes = {k: v for k, v in metric_attributes.items() if k != semconv.OUTCOME}
    histogram = providers.meter_provider.get_meter("bench").create_histogram("bench.duration", unit="s")
    quiet_provider = MeterProvider([InMemoryMetricReader()], exemplar_filter=AlwaysOffExemplarFilter())
    quiet_histogram = quiet_provider.get_meter("bench").create_histogram("bench.duration", unit="s")
    key = context.create_key("bench.run")

    def each(call: Callable[[], object]) -> Runner:
        async def run(n: int) -> None:
            token = context.attach(current)
            for _ in range(n):
                call()
            context.detach(token)

        return run

    def span_with(operation: Callable[[trace.Span], object]) -> Callable[[], None]:
        def call() -> None:
            span = tracer.start_span("x")
            operation(span)
            span.end()

        return call

    def set_two(span: trace.Span) -> None:
        span.set_attribute(semconv.OUTCOME, semconv.OUTCOME_SUCCESS)
        span.set_attribute(semconv.BLOCKING_MAX, 0.000045)

    return {
        "bare child span, start_span('x').end() (the base of + rows)": each(lambda: tracer.start_span("x").end()),
        "child span with the 6 start attributes, start + end": each(
            lambda: tracer.start_span(
                "BackgroundTask f", current, SpanKind.INTERNAL, start_attributes, None, time.time_ns()
            ).end(time.time_ns())
        ),
        "+ set_attributes({2}) before end": each(span_with(lambda span: span.set_attributes(end_attributes))),
        "+ set_attribute() x2 before end": each(span_with(set_two)),
        "+ add_event with 1 attribute on the span": each(
            span_with(lambda span: span.add_event("background_task.enqueued", {semconv.CODE_FUNCTION_NAME: "f"}))
        ),
        "histogram.record, 3 attributes, sampled span current": each(
            lambda: histogram.record(0.000123, metric_attributes)
        ),
        "histogram.record, 3 attributes, exemplars off": each(
            lambda: quiet_histogram.record(0.000123, metric_attributes)
        ),
        "histogram.record, 2 attributes, sampled span current": each(
            lambda: histogram.record(0.000123, queue_attributes)
        ),
        "context attach(set_value(set_span_in_context)) + detach": each(
            lambda: context.detach(context.attach(context.set_value(key, 1, trace.set_span_in_context(request))))
        ),
    }


# -- instruction counts: one callgrind process per arm -----------------------------------------------

MARKS_PER_RUNNER = 4  # set-up | n iterations | gc.collect() | 2n iterations


async def measure_regions(runners: Sequence[Runner], n: int, warmup: int) -> None:
    """Mark, for each runner, a region of n iterations and one of 2n, after a warm-up; see callgrind.py."""
    for run in runners:
        await run(warmup)
        gc.collect()
        callgrind.mark()
        await run(n)
        callgrind.mark()
        gc.collect()
        callgrind.mark()
        await run(2 * n)
        callgrind.mark()


def child(name: str, n: int, warmup: int) -> int:
    """The process callgrind runs: one arm (or the SDK pieces), checked, then measured."""
    if name == "pieces":
        runners = list(pieces(make_providers(DropExporter())).values())
    else:
        check(name)
        run, _ = ARMS[name].install(make_providers(DropExporter()))
        runners = [run]
    asyncio.run(measure_regions(runners, n, warmup))
    return 0


@dataclass(frozen=True)
class Count:
    """Instructions per iteration of one runner, from the 2n region minus the n region."""

    per_iteration: float
    drift: float  # (2n region - n region) / n region - 1: 0 when every iteration costs the same
    dump: Path  # the 2n region, for callgrind_annotate


def counts_of(out_file: Path, runners: int, n: int) -> list[Count]:
    found = callgrind.regions(out_file, MARKS_PER_RUNNER * runners)
    dumps = callgrind.dump_files(out_file)
    counts = []
    for i in range(runners):
        once, twice = found[MARKS_PER_RUNNER * i], found[MARKS_PER_RUNNER * i + 2]
        per = callgrind.per_iteration(once, twice, n)
        counts.append(Count(per, (twice - once) / once - 1, dumps[MARKS_PER_RUNNER * i + 3]))
    return counts


def run_children(jobs: list[tuple[str, int]], out_dir: Path, parallel: int, warmup: int) -> None:
    """Run each (name, n) under callgrind, ``parallel`` at a time; fail with the child's output if one fails.

    A name ``arm~i`` runs ``arm`` in memory layout ``i`` (see :func:`callgrind.environment`).
    """
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    script = str(Path(__file__).resolve())
    while pending or running:
        while pending and len(running) < parallel:
            name, n = pending.pop(0)
            arm, _, layout = name.partition("~")
            log = out_dir / f"{name}.log"
            argv = [sys.executable, script, "--child", arm, "--n", str(n), "--warmup", str(warmup)]
            with log.open("wb") as output:
                process = subprocess.Popen(
                    callgrind.command(out_dir / f"{name}.out", argv),
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=callgrind.environment(int(layout or 0)),
                )
            running.append((name, process, log))
        time.sleep(0.2)
        for entry in list(running):
            name, process, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0:
                for _, other, _ in running:
                    other.kill()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise SystemExit(f"arm {name!r} failed under callgrind (exit {process.returncode}):\n{tail}")
            print(f"  {name} done", file=sys.stderr, flush=True)


# C functions whose calls say what a task allocates and how often it reads the clock.
C_CALLS = {
    "memory blocks": ("_PyObject_Malloc", "_PyObject_Calloc"),
    "GC-tracked objects": ("_PyObject_GC_Link",),
    "clock reads": ("clock_gettime",),
    "GC runs": ("gc_collect_main",),
}


def instructions_mode(args: argparse.Namespace) -> int:
    why_not = callgrind.available()
    if why_not:
        raise SystemExit(f"--instructions needs callgrind: {why_not}")
    n = args.n or (40 if args.quick else 200)
    names = selected_arms(args.breakdown, args.only)
    # The unit is one span, not a request of five tasks: run it once per task. A request arm: n requests.
    jobs = [(name, n if ARMS[name].per_request else n * TASKS // ARMS[name].per) for name in names]
    # A per-request figure is a few thousand instructions between two processes of about 450 k each, and
    # moves by up to 1.4 k with the processes' memory layout alone: measured in several layouts, averaged.
    layouts = range(1, args.layouts)
    jobs += [(f"{name}~{i}", n) for name in names if ARMS[name].per_request for i in layouts]
    if args.breakdown:
        jobs.append(("pieces", n * TASKS))
    check_all(names)  # fail fast, before minutes under callgrind
    started = time.monotonic()
    keep = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="bench_overhead.")
    with keep as directory:
        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"callgrind: {len(jobs)} processes, {args.jobs} at a time, files in {out_dir}", file=sys.stderr)
        run_children(jobs, out_dir, args.jobs, args.warmup)
        every = {name: counts_of(out_dir / f"{name}.out", 1, runs)[0] for name, runs in jobs if name != "pieces"}
        counts = {name: every[name] for name in names}
        in_layouts = {
            name: [every[name]] + [every[f"{name}~{i}"] for i in layouts] for name in names if ARMS[name].per_request
        }
        per_task = {name: count.per_iteration / ARMS[name].per for name, count in counts.items()}
        print(header(f"{n} requests of {TASKS} async tasks per arm ({n * TASKS} bare spans for the unit)"))
        task_arms = [name for name in names if not ARMS[name].per_request]
        print_counts(task_arms, counts, per_task)
        print_calls(task_arms, counts, n)
        print_requests([name for name in names if ARMS[name].per_request], in_layouts, per_task["unit"], n)
        if args.breakdown:
            print_parts(per_task)
            print_pieces(per_task["unit"], out_dir, n)
    print(f"\n{time.monotonic() - started:.0f} s under callgrind", file=sys.stderr)
    return 0


def print_counts(names: Sequence[str], counts: dict[str, Count], per_task: dict[str, float]) -> None:
    span = per_task["unit"]
    print("Instructions under callgrind, one process per arm: (region of 2n requests - region of n) / n / 5.")
    print("Rows with a sign: extra per task over the arm's baseline, the uninstrumented arm with the same request")
    print("(for FastAPI native: fastapi.BackgroundTasks without operation spans). Other rows: per task as measured.")
    print()
    print(f"{'arm':62} {'instructions/task':>17} {'bare spans/task':>15} {'target':>7} {'drift':>7}")
    for name in names:
        arm = ARMS[name]
        drift = f"{counts[name].drift:+7.2%}"
        if arm.baseline is None:
            print(f"{arm.label:62} {per_task[name]:17,.0f} {per_task[name] / span:15.2f} {'':>7} {drift}")
            continue
        extra = per_task[name] - per_task[arm.baseline]
        target = TARGETS.get(name)
        verdict = "" if target is None else (" ok" if extra / span <= target else " OVER")
        target_text = "" if target is None else f"<= {target}"
        print(f"{arm.label:62} {extra:+17,.0f} {extra / span:15.2f} {target_text:>7} {drift}{verdict}")


def print_requests(names: Sequence[str], counts: dict[str, list[Count]], span: float, n: int) -> None:
    """Per request through contrib's middleware: what request_metrics_end_at_response adds, tasks or not.

    ``counts``: each arm's count in each memory layout; a row shows the mean, and the extra's range.
    """
    if not names:
        return
    layouts = len(counts[names[0]])
    print(f"\nPer request through contrib's OpenTelemetryMiddleware ({n} requests per region), instructions:")
    print("rows with a sign: extra over the same request with request_metrics_end_at_response off,")
    print(f"the mean over {layouts} memory layout(s), each arm and its baseline in the same layout; and each layout's.")
    print(f"{'arm':62} {'instructions/req':>17} {'bare spans/req':>15} {'target':>7} {'drift':>7}  per layout")
    for name in names:
        arm, per_layout = ARMS[name], counts[name]
        mean = statistics.fmean(count.per_iteration for count in per_layout)
        drift = f"{max((count.drift for count in per_layout), key=abs):+7.2%}"
        if arm.baseline is None:
            print(f"{arm.label:62} {mean:17,.0f} {mean / span:15.2f} {'':>7} {drift}")
            continue
        baselines = counts[arm.baseline]
        extras = [count.per_iteration - base.per_iteration for count, base in zip(per_layout, baselines, strict=True)]
        extra = statistics.fmean(extras)
        target = REQUEST_TARGETS.get(name)
        verdict = "" if target is None else (" ok" if extra <= target else " OVER")
        target_text = "" if target is None else f"<= {target / 1000:g}k"
        spread = "  " + " ".join(f"{value / 1000:+.1f}k" for value in extras) if layouts > 1 else ""
        print(f"{arm.label:62} {extra:+17,.0f} {extra / span:15.3f} {target_text:>7} {drift}{verdict:5}{spread}")


def print_calls(names: Sequence[str], counts: dict[str, Count], n: int) -> None:
    """Allocations and clock reads per task, from the call counts in each arm's 2n region."""
    tasks_in_region = 2 * n * TASKS  # 2n requests of TASKS tasks (2n * TASKS spans for the unit)
    every_function = [function for functions in C_CALLS.values() for function in functions]
    called: dict[str, dict[str, float]] = {}
    for name, count in counts.items():
        found = callgrind.calls(count.dump, every_function)
        called[name] = {
            label: sum(found[function] for function in functions) / tasks_in_region
            for label, functions in C_CALLS.items()
        }
    print()
    print("C calls per task (signed: extra over the baseline), from callgrind's call counts:")
    print(f"{'arm':62} " + " ".join(f"{label:>18}" for label in C_CALLS))
    for name in names:
        base = ARMS[name].baseline
        cells = []
        for label in C_CALLS:
            value = called[name][label] - (called[base][label] if base else 0.0)
            cells.append(f"{value:+18.1f}" if base else f"{value:18.1f}")
        print(f"{ARMS[name].label:62} " + " ".join(cells))


def print_parts(per_task: dict[str, float]) -> None:
    """Where the default task's cost goes, from the arms with one part swapped for the API's no-op."""
    span = per_task["unit"]

    def extra(name: str, base: str) -> float:
        return (per_task[name] - per_task[base]) / span

    if not {"bgtasks_no_meter", "bgtasks_no_tracer", "bgtasks_no_providers", "bgtasks_no_timer"} <= per_task.keys():
        return
    whole = extra("bgtasks", "plain")
    parts = [
        ("the task span: start, attributes, events, end", extra("bgtasks_no_meter", "bgtasks_no_providers")),
        ("metrics: histograms and counts", extra("bgtasks_no_tracer", "bgtasks_no_providers")),
        ("otel_bgtasks itself, with no-op providers", extra("bgtasks_no_providers", "plain")),
    ]
    print("\nWhere the default task's cost goes (one part swapped for the API's no-op), bare spans per task:")
    for label, part in parts:
        print(f"  {label:66} {part:6.2f}")
    print(f"  {'  of which the event-loop blocking timer':66} {extra('bgtasks', 'bgtasks_no_timer'):6.2f}")
    print(f"  {'sum of the parts / whole':66} {sum(part for _, part in parts) / whole:6.2f}")


def print_pieces(span: float, out_dir: Path, n: int) -> None:
    piece_runners = pieces(make_providers(DropExporter()))
    piece_counts = counts_of(out_dir / "pieces.out", len(piece_runners), n * TASKS)
    child_span = piece_counts[0].per_iteration
    print("\nSDK calls, each alone, a sampled request span current, in bare spans")
    print("(rows with +: the call alone, over a child span started and ended):")
    for label, count in zip(piece_runners, piece_counts, strict=True):
        value = count.per_iteration - (child_span if label.startswith("+") else 0)
        print(f"  {label:66} {value / span:6.2f} {value:10,.0f} instructions")


# -- times: one process, arms alternating ------------------------------------------------------------


def time_mode(args: argparse.Namespace) -> int:
    n, rounds = (100, 5) if args.quick else (400, 15)
    names = selected_arms(True, args.only)
    providers = make_providers(DropExporter())
    check_all(names)
    samples: dict[str, list[float]] = {name: [] for name in names}

    async def one_round() -> None:
        for name in names:
            arm = ARMS[name]
            run, remove = arm.install(providers)
            runs = n * TASKS // arm.per
            await run(args.warmup * TASKS // arm.per)  # first calls fill caches: not what a task costs
            gc.collect()
            started = time.process_time()
            await run(runs)
            samples[name].append((time.process_time() - started) / (runs * arm.per))
            remove()

    for _ in range(rounds):
        asyncio.run(one_round())
    per_unit = {name: statistics.median(values) for name, values in samples.items()}
    span = per_unit["unit"]
    print(header(f"{n} requests of {TASKS} tasks per arm and round, median of {rounds} rounds"))
    print(f"{'arm':62} {'bare spans/task':>15} {'target':>7}")
    for name in names:
        arm = ARMS[name]
        if arm.baseline is None:
            continue
        ratio = (per_unit[name] - per_unit[arm.baseline]) / span
        target = TARGETS.get(name)
        verdict = "" if target is None else (" ok" if ratio <= target else " OVER")
        label = f"{arm.label} (per request)" if arm.per_request else arm.label
        print(f"{label:62} {ratio:15.2f} {'' if target is None else f'<= {target}':>7}{verdict}")
    print(f"\nuninstrumented task / bare span: {per_unit['plain'] / span:.2f} (context: what a no-op task costs)")
    print_parts(per_unit)
    return 0


def header(what: str) -> str:
    packages = ["fastapi", "starlette", "opentelemetry-sdk", "opentelemetry-instrumentation-fastapi"]
    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except Exception:
            found.append(f"{package} absent")
    return (
        f"Python {sys.version.split()[0]}, {', '.join(found)}, otel_bgtasks {otel_bgtasks.__version__} "
        f"({measured_revision()}), {os.cpu_count()} CPUs\n{what}"
    )


def measured_revision() -> str:
    """The last commit that changed the package measured, and whether its files differ from it."""
    package = Path(otel_bgtasks.__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True).stdout.strip()

    revision = git("log", "-1", "--format=%h %cs", "--", ".")
    if not revision:
        return "not a git checkout"
    return revision + (", with uncommitted changes" if git("status", "--porcelain", "--", ".") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, for a smoke run")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--breakdown", action="store_true", help="--instructions, and where the cost goes")
    parser.add_argument("--only", help="comma-separated arms (their baselines and the unit are added)")
    parser.add_argument("--jobs", type=int, default=2, help="callgrind processes at a time [2]")
    parser.add_argument("--n", type=int, help="requests per region under callgrind [200; 40 with --quick]")
    parser.add_argument("--warmup", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument(
        "--layouts", type=int, default=4, help="memory layouts each per-request arm runs in, averaged [4]"
    )
    parser.add_argument("--keep", help="write callgrind's files to this directory (default: a new temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.n, args.warmup)
    if args.instructions or args.breakdown:
        return instructions_mode(args)
    return time_mode(args)


if __name__ == "__main__":
    raise SystemExit(main())
