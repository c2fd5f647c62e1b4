"""Every signal of a task points at the task's span, and the values in them are right.

The ERROR record of a failure, exported through OpenTelemetry's logs pipeline, carries the task span's
trace and span id (also in link mode, where the request is another trace); the histograms' exemplars
name the task span, and there is none for a task that was not sampled; the record says where the task
failed and what the message was; the histograms have bounds in seconds and sums that match the spans.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _metrics import metrics_by_name, points
from conftest import task_spans
from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks

try:  # renamed in opentelemetry-sdk 1.39
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter as InMemoryLogExporter
except ImportError:  # pragma: no cover - the oldest supported SDK
    from opentelemetry.sdk._logs.export import InMemoryLogExporter  # pyright: ignore[reportAttributeAccessIssue]

HAS_EXEMPLARS = "exemplars" in inspect.signature(HistogramDataPoint).parameters  # opentelemetry-sdk >= 1.27
needs_exemplars = pytest.mark.skipif(not HAS_EXEMPLARS, reason="this opentelemetry-sdk has no exemplars (1.27+)")


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def instrument(tracer_provider: TracerProvider, reader: InMemoryMetricReader) -> Iterator[Any]:
    def instrument(app: Any = None, **options: Any) -> Any:
        options.setdefault("tracer_provider", tracer_provider)
        return otel_bgtasks.instrument(app, meter_provider=MeterProvider([reader]), **options)

    yield instrument


async def fail() -> None:
    raise ValueError("no stock")  # the line the ERROR record names


def after() -> None:
    pass


def ids(span: ReadableSpan) -> tuple[int, int]:
    return span.context.trace_id, span.context.span_id


# -- The ERROR record through the OpenTelemetry logs pipeline ---------------------------------------------


def _handlers() -> list[Any]:
    handlers: list[Any] = [pytest.param("sdk", id="sdk-LoggingHandler")]
    try:  # where opentelemetry-instrument takes it from since contrib 0.60b0
        import opentelemetry.instrumentation.logging.handler  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        handlers.append(pytest.param("contrib", marks=pytest.mark.skip(reason="no handler in this contrib")))
    else:
        handlers.append(pytest.param("contrib", id="contrib-LoggingHandler"))
    return handlers


@pytest.fixture(params=_handlers())
def exported_logs(request: pytest.FixtureRequest) -> Iterator[InMemoryLogExporter]:
    """The logs pipeline opentelemetry-instrument sets up: a LoggingHandler on the root logger, to an exporter."""
    log_exporter = InMemoryLogExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's own, deprecated from 1.39 on
        if request.param == "sdk":
            from opentelemetry.sdk._logs import LoggingHandler
        else:
            from opentelemetry.instrumentation.logging.handler import (  # pyright: ignore[reportMissingImports]
                LoggingHandler,  # pyright: ignore[reportUnknownVariableType]
            )
        handler = LoggingHandler(level=logging.WARNING, logger_provider=provider)  # pyright: ignore[reportUnknownVariableType]
    root = logging.getLogger()
    root.addHandler(handler)  # pyright: ignore[reportUnknownArgumentType]
    try:
        yield log_exporter
    finally:
        root.removeHandler(handler)  # pyright: ignore[reportUnknownArgumentType]
        provider.shutdown()


def failing_app(lone: bool) -> Starlette:
    """A route whose failing task is alone, or first of a BackgroundTasks (its report waits for the skipped)."""

    async def route(request: Request) -> Response:
        if lone:
            return PlainTextResponse("answered", background=BackgroundTask(fail))
        tasks = BackgroundTasks()
        tasks.add_task(fail)
        tasks.add_task(after)  # skipped: the failure's report names it, after the task's context is gone
        return PlainTextResponse("answered", background=tasks)

    return Starlette(routes=[Route("/", route)])


@pytest.mark.parametrize("lone", [True, False], ids=["BackgroundTask", "BackgroundTasks"])
@pytest.mark.parametrize("mode", ["child", "link"])
async def test_the_exported_error_record_carries_the_task_spans_ids(
    instrument: Any, exporter: InMemorySpanExporter, exported_logs: InMemoryLogExporter, mode: str, lone: bool
) -> None:
    app = instrument(failing_app(lone), mode=mode)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).text == "answered"

    (request,) = [s for s in exporter.get_finished_spans() if s.name == "GET /"]
    (task,) = [s for s in task_spans(exporter) if s.attributes and s.attributes["background_task.outcome"] == "error"]
    # The task span's parent is the request in child mode; in link mode it is a trace of its own.
    assert (task.context.trace_id == request.context.trace_id) is (mode == "child")
    (record,) = [log.log_record for log in exported_logs.get_finished_logs() if log.log_record.severity_text == "ERROR"]
    assert f"Background task {__name__}.fail failed (error): ValueError: no stock" in str(record.body)
    assert (record.trace_id, record.span_id) == ids(task)
    assert record.trace_flags is not None and record.trace_flags.sampled
    # The tasks left unrun are the request's: so is the WARNING that names them (README, Logs).
    skipped = [log.log_record for log in exported_logs.get_finished_logs() if "Skipped" in str(log.log_record.body)]
    assert [(w.trace_id, w.span_id) for w in skipped] == ([] if lone else [ids(request)])


async def test_the_blocked_event_loop_warning_carries_the_task_spans_ids(
    instrument: Any, exporter: InMemorySpanExporter, exported_logs: InMemoryLogExporter
) -> None:
    instrument(mode="link", blocking_threshold=0.01)

    async def blocks() -> None:
        time.sleep(0.02)

    with trace.get_tracer("tests").start_as_current_span("request"):
        await BackgroundTask(blocks)()

    (task,) = task_spans(exporter)
    (record,) = [log.log_record for log in exported_logs.get_finished_logs()]
    assert "blocked the event loop" in str(record.body)
    assert (record.trace_id, record.span_id) == ids(task)


async def test_the_record_names_the_task_span_in_the_standard_logging_fields_too(
    instrument: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    instrument(mode="link")
    request = trace.get_tracer("tests").start_as_current_span("request")
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), request, pytest.raises(ValueError):
        await BackgroundTask(fail)()
    (task,) = task_spans(exporter)
    (record,) = [r for r in caplog.records if r.name == "otel_bgtasks"]
    assert (record.otelTraceID, record.otelSpanID) == (
        trace.format_trace_id(task.context.trace_id),
        trace.format_span_id(task.context.span_id),
    )
    assert trace.get_current_span() is trace.INVALID_SPAN  # the task's context was attached for the record only


# -- Where the record comes from, and what it says --------------------------------------------------------

FAIL_LINE = inspect.getsourcelines(fail)[1] + 1


async def test_the_record_says_where_the_task_raised_and_no_all_zero_ids_without_a_trace(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    instrument(tracer_provider=trace.NoOpTracerProvider())  # as the pytest plugin instruments
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), pytest.raises(ValueError):
        await BackgroundTask(fail)()

    (record,) = [r for r in caplog.records if r.name == "otel_bgtasks"]
    assert (record.pathname, record.lineno, record.funcName) == (__file__, FAIL_LINE, "fail")
    assert record.getMessage() == f"Background task {__name__}.fail failed (error): ValueError: no stock [no trace]"
    assert not hasattr(record, "otelTraceID")
    assert "0000000000000000" not in caplog.text


async def test_a_task_without_python_code_is_located_where_it_was_created(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    instrument()
    task = BackgroundTask(int, "not a number")  # a builtin: no file and line of its own
    created = inspect.currentframe().f_lineno - 1  # pyright: ignore[reportOptionalMemberAccess]
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), pytest.raises(ValueError):
        await task()
    (record,) = [r for r in caplog.records if r.name == "otel_bgtasks"]
    assert (record.pathname, record.lineno) == (__file__, created)


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("no stock", "ValueError: no stock"),
        ("card declined\n  code: 51\r\n\tretry later", "ValueError: card declined code: 51 retry later"),
        ("", "ValueError"),
        ("x" * 500, "ValueError: " + "x" * 199 + "…"),
    ],
    ids=["short", "lines", "empty", "long"],
)
async def test_the_record_has_the_message_on_one_bounded_line(
    instrument: Any, caplog: pytest.LogCaptureFixture, message: str, shown: str
) -> None:
    instrument()

    async def declined() -> None:
        raise ValueError(message)

    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), pytest.raises(ValueError):
        await BackgroundTask(declined)()
    (record,) = [r for r in caplog.records if r.name == "otel_bgtasks"]
    line = record.getMessage()
    assert f"failed (error): {shown} [trace_id=" in line
    assert "\n" not in line


# -- Exemplars --------------------------------------------------------------------------------------------


def exemplar_ids(point: HistogramDataPoint) -> list[tuple[int | None, int | None]]:
    return [(exemplar.trace_id, exemplar.span_id) for exemplar in point.exemplars]


@needs_exemplars
@pytest.mark.parametrize("mode", ["child", "link"])
async def test_exemplars_name_the_task_span(
    instrument: Any, exporter: InMemorySpanExporter, reader: InMemoryMetricReader, mode: str
) -> None:
    instrument(mode=mode, continue_on_error=True, queue_duration_metric=True)

    def sync_ok() -> None:
        pass

    # As Starlette runs them: in the request's context, whose span an exemplar taken at the end would name.
    with trace.get_tracer("tests").start_as_current_span("request"):
        await BackgroundTasks([BackgroundTask(sync_ok), BackgroundTask(fail)])()

    spans = {s.attributes["code.function.name"]: s for s in task_spans(exporter) if s.attributes}
    ok_span, failed_span = spans[f"{__name__}.{sync_ok.__qualname__}"], spans[f"{__name__}.fail"]
    metrics = metrics_by_name(reader)
    by_outcome = {
        dict(attributes)["background_task.outcome"]: point
        for attributes, point in points(metrics["background_task.duration"]).items()
    }
    assert exemplar_ids(by_outcome["success"]) == [ids(ok_span)]  # the fast path
    assert exemplar_ids(by_outcome["error"]) == [ids(failed_span)]  # a run with something to report
    (wait,) = points(metrics["background_task.threadpool.wait"]).values()
    assert exemplar_ids(wait) == [ids(ok_span)]
    queued = {
        dict(a)["background_task.execution"]: p for a, p in points(metrics["background_task.queue.duration"]).items()
    }
    assert exemplar_ids(queued["threadpool"]) == [ids(ok_span)]
    assert exemplar_ids(queued["async"]) == [ids(failed_span)]


@needs_exemplars
async def test_no_exemplar_for_a_task_that_was_not_sampled(reader: InMemoryMetricReader) -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    otel_bgtasks.instrument(tracer_provider=unsampled, meter_provider=MeterProvider([reader]), continue_on_error=True)

    def sync_ok() -> None:
        pass

    # The request is sampled: an exemplar taken from the context current at the end would name it.
    with trace.get_tracer("tests").start_as_current_span("request") as request:
        assert request.get_span_context().trace_flags.sampled
        tasks = BackgroundTasks([BackgroundTask(sync_ok), BackgroundTask(fail)])
        await tasks()

    metrics = metrics_by_name(reader)
    histograms = [metrics["background_task.duration"], metrics["background_task.threadpool.wait"]]
    counted = [point for metric in histograms for point in points(metric).values()]
    assert [point.count for point in counted] == [1, 1, 1]
    assert [exemplar_ids(point) for point in counted] == [[], [], []]


# -- Histogram bounds and values --------------------------------------------------------------------------

SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
ADVICE = (
    "explicit_bucket_boundaries_advisory"
    in inspect.signature(MeterProvider().get_meter("x").create_histogram).parameters
)


def readme_view_reader() -> tuple[InMemoryMetricReader, MeterProvider]:
    """The meter provider README's View makes, for an SDK that takes no bucket advice (before 1.30)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE) if "View(" in b]
    namespace: dict[str, Any] = {"reader": InMemoryMetricReader()}
    exec(block, namespace)  # the README's own code
    return namespace["reader"], namespace["meter_provider"]


async def test_the_readmes_view_gives_the_bounds(tracer_provider: TracerProvider) -> None:
    reader, meter_provider = readme_view_reader()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    await BackgroundTask(time.sleep, 0.001)()
    for name in ["background_task.duration", "background_task.threadpool.wait"]:
        (point,) = points(metrics_by_name(reader)[name]).values()
        assert list(point.explicit_bounds) == SECONDS


async def test_histograms_have_bounds_in_seconds_and_durations_match_the_spans(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader, exporter: InMemorySpanExporter
) -> None:
    if ADVICE:
        meter_provider = MeterProvider([reader])
    else:
        reader, meter_provider = readme_view_reader()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, queue_duration_metric=True)

    async def waits_200ms() -> None:
        await asyncio.sleep(0.2)

    def works_200ms() -> None:
        time.sleep(0.2)

    await BackgroundTasks([BackgroundTask(waits_200ms), BackgroundTask(works_200ms)])()

    metrics = metrics_by_name(reader)
    for name in ["background_task.duration", "background_task.threadpool.wait", "background_task.queue.duration"]:
        for point in points(metrics[name]).values():
            assert list(point.explicit_bounds) == SECONDS, name
    spans = {s.attributes["code.function.name"].rsplit(".", 1)[-1]: s for s in task_spans(exporter) if s.attributes}
    durations = {
        dict(a)["code.function.name"].rsplit(".", 1)[-1]: p
        for a, p in points(metrics["background_task.duration"]).items()
    }
    for name in ["waits_200ms", "works_200ms"]:
        span, point = spans[name], durations[name]
        assert span.end_time is not None and span.start_time is not None
        assert point.count == 1
        assert point.sum == pytest.approx((span.end_time - span.start_time) / 1e9, abs=1e-6)
        assert 0.2 <= point.sum < 0.2 + 0.5, name  # seconds, not milliseconds or nanoseconds
        # In the bucket of its value: (0.1, 0.25] for 0.2 s, unless the machine was slow.
        assert point.bucket_counts[bisect.bisect_left(SECONDS, point.sum)] == 1, name


async def test_threadpool_wait_sums_what_the_spans_say(
    instrument: Any, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    """A slow def task with a free worker waits about nothing, however long it runs."""
    instrument()

    def slow() -> None:
        time.sleep(0.3)

    for _ in range(2):
        await BackgroundTask(slow)()

    waits = [s.attributes["background_task.threadpool.wait"] for s in task_spans(exporter) if s.attributes]
    assert len(waits) == 2 and all(0 <= wait < 0.05 for wait in waits), waits
    (point,) = points(metrics_by_name(reader)["background_task.threadpool.wait"]).values()
    assert point.count == 2
    assert point.sum == pytest.approx(sum(waits), abs=1e-9)  # type: ignore[arg-type]
