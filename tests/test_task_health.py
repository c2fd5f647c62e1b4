"""Task health: metrics, stalls, failure handling, and the common mistakes made obvious."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from _metrics import metrics_by_name, points
from _servers import WAIT_SECONDS
from conftest import WITHOUT_NATIVE_TELEMETRY, task_spans
from fastapi import BackgroundTasks as FastAPIBackgroundTasks
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks

FUNC = "code.function.name"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def instrument(tracer_provider: TracerProvider, reader: InMemoryMetricReader) -> Iterator[Any]:
    def instrument(**options: Any) -> None:
        otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]), **options)

    yield instrument


def ok() -> None:
    pass


async def fail() -> None:
    raise ValueError("no stock")


async def never() -> None:
    raise AssertionError("skipped, never run")


async def test_metric_names_units_and_attributes(instrument: Any, reader: InMemoryMetricReader) -> None:
    instrument(queue_duration_metric=True)  # off by default: the queue delay is a span attribute
    with pytest.raises(ValueError, match="no stock"):
        await BackgroundTasks([BackgroundTask(ok), BackgroundTask(fail), BackgroundTask(never)])()

    metrics = metrics_by_name(reader)
    assert {name: m.unit for name, m in metrics.items()} == {
        "background_task.duration": "s",
        "background_task.queue.duration": "s",
        "background_task.threadpool.wait": "s",
        "background_task.active": "{task}",
        "background_task.outcomes": "{task}",
    }
    ok_name, fail_name, never_name = (f"{__name__}.{f.__name__}" for f in (ok, fail, never))
    duration = points(metrics["background_task.duration"])
    assert set(duration) == {
        frozenset(
            {FUNC: ok_name, "background_task.outcome": "success", "background_task.execution": "threadpool"}.items()
        ),
        frozenset(
            {
                FUNC: fail_name,
                "background_task.outcome": "error",
                "background_task.execution": "async",
                "error.type": "ValueError",
            }.items()
        ),
    }
    assert all(point.count == 1 for point in duration.values())
    queue = points(metrics["background_task.queue.duration"])
    assert set(queue) == {
        frozenset({FUNC: ok_name, "background_task.execution": "threadpool"}.items()),
        frozenset({FUNC: fail_name, "background_task.execution": "async"}.items()),
    }
    outcomes = {
        (dict(key)[FUNC], dict(key)["background_task.outcome"]): point.value
        for key, point in points(metrics["background_task.outcomes"]).items()
    }
    assert outcomes == {(ok_name, "success"): 1, (fail_name, "error"): 1, (never_name, "skipped"): 1}
    active = {dict(key)[FUNC]: point.value for key, point in points(metrics["background_task.active"]).items()}
    assert active == {ok_name: 0, fail_name: 0}
    (wait,) = points(metrics["background_task.threadpool.wait"]).values()
    assert wait.count == 1


async def test_active_counts_a_running_task(instrument: Any, reader: InMemoryMetricReader) -> None:
    instrument()
    release = asyncio.Event()
    started = asyncio.Event()

    async def long_running() -> None:
        started.set()
        await release.wait()

    running = asyncio.ensure_future(BackgroundTask(long_running)())
    await started.wait()
    (point,) = points(metrics_by_name(reader)["background_task.active"]).values()
    assert point.value == 1
    release.set()
    await running
    (point,) = points(metrics_by_name(reader)["background_task.active"]).values()
    assert point.value == 0


async def test_blocking_async_task_is_flagged_once(
    instrument: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    instrument(blocking_threshold=0.05)

    async def blocks_the_loop() -> None:
        await asyncio.sleep(0)
        time.sleep(0.12)  # the classic mistake

    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        await BackgroundTask(blocks_the_loop)()
        await BackgroundTask(blocks_the_loop)()

    first, second = task_spans(exporter)
    for span in (first, second):
        assert span.attributes is not None
        assert span.attributes["background_task.blocking.max"] >= 0.12
        (event,) = [e for e in span.events if e.name == "background_task.event_loop_blocked"]
        assert event.attributes is not None and event.attributes["background_task.blocking.max"] >= 0.12
    warnings_logged = [r for r in caplog.records if "blocked the event loop" in r.getMessage()]
    assert len(warnings_logged) == 1
    assert "blocks_the_loop" in warnings_logged[0].getMessage()
    assert "`def`" in warnings_logged[0].getMessage()


POLITE_SLEEP = 0.15  # each await: longer than the threshold below, so that time spent awaiting would be flagged
POLITE_THRESHOLD = 0.1  # the time a step between awaits (microseconds) may take on a loaded 2-core machine


async def test_task_that_awaits_often_is_not_flagged(instrument: Any, exporter: InMemorySpanExporter) -> None:
    """Only the time between awaits counts: this task runs 0.45 s, but never holds the loop for more than a moment.

    A timer that counted the task's whole run (0.45 s) or a time spent awaiting (0.15 s) would exceed the
    threshold, so the check allows 0.1 s of scheduling noise per step and still catches either mistake.
    """
    instrument(blocking_threshold=POLITE_THRESHOLD)

    async def polite() -> None:
        for _ in range(3):
            await asyncio.sleep(POLITE_SLEEP)

    await BackgroundTask(polite)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.blocking.max"] < POLITE_THRESHOLD
    assert [e.name for e in span.events] == []


@asynccontextmanager
async def the_only_worker_thread_busy() -> AsyncIterator[threading.Event]:
    """anyio's thread pool cut to one thread, which another job holds until the event yielded is set."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    saved = limiter.total_tokens
    limiter.total_tokens = 1
    release = threading.Event()
    holding = threading.Event()

    def occupy_the_only_thread() -> None:
        holding.set()
        release.wait(WAIT_SECONDS)

    occupant = asyncio.ensure_future(anyio.to_thread.run_sync(occupy_the_only_thread))
    try:
        # Wait off anyio's limiter, whose only token the occupant now holds.
        await asyncio.get_running_loop().run_in_executor(None, holding.wait)
        yield release
    finally:
        release.set()
        await occupant
        limiter.total_tokens = saved


async def test_threadpool_wait_measured_when_the_limiter_is_saturated(
    instrument: Any, exporter: InMemorySpanExporter
) -> None:
    instrument()
    async with the_only_worker_thread_busy() as release:
        queued = asyncio.ensure_future(BackgroundTask(ok)())
        await asyncio.sleep(0.1)  # not synchronisation: the wait being measured
        release.set()
        await queued

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.threadpool.wait"] >= 0.1


async def test_continue_on_error_runs_the_rest_and_does_not_raise(
    instrument: Any, exporter: InMemorySpanExporter
) -> None:
    instrument(continue_on_error=True)
    ran: list[str] = []

    await BackgroundTasks([BackgroundTask(fail), BackgroundTask(ran.append, "after"), BackgroundTask(fail)])()

    assert ran == ["after"]
    outcomes = [s.attributes["background_task.outcome"] for s in task_spans(exporter) if s.attributes]
    assert outcomes == ["error", "success", "error"]


async def test_default_stops_at_the_first_failure_like_starlette(instrument: Any) -> None:
    instrument()
    ran: list[str] = []
    with pytest.raises(ValueError):
        await BackgroundTasks([BackgroundTask(fail), BackgroundTask(ran.append, "after")])()
    assert ran == []


@pytest.mark.parametrize("timed", [True, False], ids=["event_loop_timed", "blocking_threshold_none"])
async def test_async_timeout_cancels_the_task(instrument: Any, exporter: InMemorySpanExporter, timed: bool) -> None:
    """With the event-loop timer on or off: both drive the task through the timeout's cancel scope."""
    instrument(timeout=0.05, **({} if timed else {"blocking_threshold": None}))
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await BackgroundTask(hangs)()

    assert cancelled.is_set()
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.outcome"] == "timeout"
    assert span.attributes["error.type"] == "TimeoutError"
    assert span.attributes["background_task.timeout"] == 0.05
    assert span.status.status_code is StatusCode.ERROR
    assert ("background_task.blocking.max" in span.attributes) is timed


@pytest.mark.parametrize("threshold", [0.1, None], ids=["default", "off"])
async def test_blocking_threshold_none_runs_tasks_untimed(
    instrument: Any, exporter: InMemorySpanExporter, threshold: float | None
) -> None:
    """``blocking_threshold=None`` turns the timer off: the task runs and returns as before, with no blocking.max."""
    instrument(blocking_threshold=threshold)
    awaited: list[str] = []

    async def polite() -> str:
        await asyncio.sleep(0)  # one suspension: the task is driven across a yield to the event loop
        awaited.append("after the yield")
        return "done"

    def plain() -> str:
        return "done"

    # Starlette's __call__ returns nothing, instrumented or not, whatever the task returns.
    assert await BackgroundTask(polite)() is None
    assert await BackgroundTask(plain)() is None
    assert awaited == ["after the yield"]
    spans = {span.name.rsplit(".", 1)[-1]: dict(span.attributes or {}) for span in task_spans(exporter)}
    assert spans["polite"]["background_task.outcome"] == spans["plain"]["background_task.outcome"] == "success"
    assert ("background_task.blocking.max" in spans["polite"]) is (threshold is not None)
    assert "background_task.blocking.max" not in spans["plain"]  # a def task holds no event loop


async def test_sync_timeout_is_reported_and_the_task_finishes(instrument: Any, exporter: InMemorySpanExporter) -> None:
    instrument()
    finished: list[bool] = []

    @otel_bgtasks.task_options(timeout=0.02)
    def slow() -> None:
        time.sleep(0.06)
        finished.append(True)

    await BackgroundTask(slow)()  # no exception: a thread cannot be stopped, and the result stands

    assert finished == [True]
    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.outcome"] == "timeout"
    assert "over its 0.02 s timeout" in str(span.status.description)


async def test_per_function_timeout_none_overrides_the_default(instrument: Any, exporter: InMemorySpanExporter) -> None:
    instrument(timeout=0.01)

    @otel_bgtasks.task_options(timeout=None)
    async def allowed_to_take_long() -> None:
        await asyncio.sleep(0.03)

    await BackgroundTask(allowed_to_take_long)()
    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.outcome"] == "success"


def test_task_options_rejects_a_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds greater than 0"):
        otel_bgtasks.task_options(timeout=-1)


async def test_every_failure_is_one_error_log_record_with_trace_ids(
    instrument: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    instrument()
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), pytest.raises(ValueError):
        await BackgroundTask(fail)()

    (span,) = task_spans(exporter)
    (record,) = [r for r in caplog.records if r.name == "otel_bgtasks" and r.levelno == logging.ERROR]
    message = record.getMessage()
    assert f"{__name__}.fail" in message
    assert trace.format_trace_id(span.context.trace_id) in message
    assert trace.format_span_id(span.context.span_id) in message
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    # The fields log pipelines correlate on, not only the text.
    assert record.otelTraceID == trace.format_trace_id(span.context.trace_id)
    assert record.otelSpanID == trace.format_span_id(span.context.span_id)


async def test_cancelled_task_is_not_a_failure(instrument: Any, caplog: pytest.LogCaptureFixture) -> None:
    instrument()
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        running = asyncio.ensure_future(BackgroundTask(waits)())
        await started.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert [r for r in caplog.records if r.name == "otel_bgtasks"] == []


class _SlowSync:
    """A ``def`` task that runs on its worker thread until released, and says when it started and ended."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> None:
        self.started.set()
        self.release.wait(WAIT_SECONDS)
        self.finished.set()


def _awaiting(slow: _SlowSync, container: str) -> Any:
    task = BackgroundTask(slow)
    return BackgroundTasks([task, BackgroundTask(never)])() if container == "tasks" else task()


def _assert_one_cancelled_run(exporter: InMemorySpanExporter, reader: InMemoryMetricReader, slow: _SlowSync) -> None:
    """One span, ``cancelled``, no error; one outcome counted, ``cancelled``, even after the thread went on."""
    assert slow.release.is_set() and slow.finished.wait(WAIT_SECONDS)  # the thread ran to its end
    (span,) = [s for s in task_spans(exporter) if s.name != "BackgroundTask never"]
    assert span.attributes is not None
    assert span.attributes["background_task.outcome"] == "cancelled"
    assert span.attributes["background_task.execution"] == "threadpool"
    assert "error.type" not in span.attributes
    assert span.status.status_code is StatusCode.UNSET
    assert [event.name for event in span.events] == []
    name = f"{__name__}._SlowSync"
    outcomes = {
        key: point.value
        for key, point in points(metrics_by_name(reader)["background_task.outcomes"]).items()
        if (FUNC, name) in key
    }
    assert outcomes == {
        frozenset(
            {(FUNC, name), ("background_task.execution", "threadpool"), ("background_task.outcome", "cancelled")}
        ): 1
    }


def _close_as_anyio_lets(coroutine: Any) -> None:
    """``close()``: anyio 4's ``to_thread.run_sync``, closed outside its task or loop, raises ``RuntimeError``.

    Its ``CapacityLimiter`` raises over the ``GeneratorExit`` ("this borrower isn't holding any of this
    CapacityLimiter's tokens", "no running event loop"): the caller sees that, as uninstrumented.
    """
    try:
        coroutine.close()
    except RuntimeError as raised:
        chain: list[BaseException] = [raised]
        while chain[-1].__context__ is not None:
            chain.append(chain[-1].__context__)  # pyright: ignore[reportArgumentType]
        assert isinstance(chain[-1], GeneratorExit)


def _no_error_logged(caplog: pytest.LogCaptureFixture, container: str) -> None:
    # opentelemetry.context: a context token detached outside the context it was made in logs an ERROR there.
    logged = [r for r in caplog.records if r.name in ("otel_bgtasks", "opentelemetry.context")]
    assert [r.getMessage() for r in logged if r.levelno >= logging.ERROR] == []
    skipped = [r.getMessage() for r in logged if r.getMessage().startswith("Skipped")]
    if container == "tasks":  # the task after it: skipped because of a cancellation, not of a failure
        assert len(skipped) == 1 and "was cancelled before they ran" in skipped[0]


@pytest.mark.parametrize("container", ["task", "tasks"])
@pytest.mark.parametrize("blocking_threshold", [0.5, None], ids=["event_loop_timed", "untimed"])
@pytest.mark.parametrize("stop", ["cancel", "close"])
async def test_sync_task_whose_wait_for_its_thread_is_stopped_is_cancelled(
    instrument: Any,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    stop: str,
    blocking_threshold: float | None,
    container: str,
) -> None:
    """Cancelled (CancelledError) or closed (anyio then raises RuntimeError) while its thread runs: ``cancelled``.

    As an ``async def`` task stopped so would be: the task did not fail, its wait was stopped from outside.
    """
    instrument(blocking_threshold=blocking_threshold)
    slow = _SlowSync()
    with caplog.at_level(logging.INFO):
        running = asyncio.ensure_future(_awaiting(slow, container))
        while not slow.started.is_set():
            await asyncio.sleep(0.005)
        if stop == "cancel":
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        else:  # the coroutine dropped while suspended
            _close_as_anyio_lets(running.get_coro())
        slow.release.set()
        if stop == "close":  # the task wakes to a closed coroutine: its own error, not ours
            await asyncio.wait([running], timeout=WAIT_SECONDS)
            running.exception()
    _assert_one_cancelled_run(exporter, reader, slow)
    _no_error_logged(caplog, container)


@pytest.mark.parametrize("container", ["task", "tasks"])
def test_sync_task_closed_by_its_dead_loop_while_its_thread_runs_is_cancelled(
    instrument: Any,
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    container: str,
) -> None:
    """Its event loop closed, the coroutine freed later: anyio raises "no running event loop" out of close()."""
    instrument()
    slow = _SlowSync()

    async def start() -> asyncio.Future[Any]:
        running = asyncio.ensure_future(_awaiting(slow, container))
        while not slow.started.is_set():
            await asyncio.sleep(0.005)
        return running

    loop = asyncio.new_event_loop()
    with caplog.at_level(logging.INFO):
        running = loop.run_until_complete(start())
        loop.close()
        coroutine = running.get_coro()  # pyright: ignore[reportUnknownVariableType]
        _close_as_anyio_lets(coroutine)
        slow.release.set()
    _assert_one_cancelled_run(exporter, reader, slow)
    _no_error_logged(caplog, container)


async def send_email(address: str) -> None:
    pass


def bad_input_app(made: list[Any] | None = None) -> Starlette:
    async def route(request: Request) -> Response:
        tasks = BackgroundTasks()
        coroutine = send_email("a@example.com")
        if made is not None:
            made.append(coroutine)
        tasks.add_task(coroutine)  # type: ignore[arg-type]  # the mistake
        return PlainTextResponse("answered", background=tasks)

    return Starlette(routes=[Route("/", route)])


async def test_coroutine_object_is_reported_at_the_call(
    instrument: Any, caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter
) -> None:
    instrument()
    app = otel_bgtasks.instrument(bad_input_app())
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine ... was never awaited" may follow
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/")
        gc.collect()

    assert response.text == "answered"
    message = next(r.getMessage() for r in caplog.records if "coroutine object" in r.getMessage())
    assert "send_email(...) called instead of passed" in message
    assert "add_task(send_email, *args, **kwargs)" in message
    assert "test_task_health.py" in message  # where the mistake is
    (request,) = [s for s in exporter.get_finished_spans() if s.name == "GET /"]
    (event,) = [e for e in request.events if e.name == "background_task.invalid"]
    assert event.attributes is not None and "coroutine object" in str(event.attributes["background_task.problem"])


async def test_strict_raises_type_error_and_the_request_still_answers(instrument: Any) -> None:
    instrument(strict=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coroutine = send_email("x")
        with pytest.raises(TypeError, match=r"add_task\(send_email, \*args, \*\*kwargs\)"):
            BackgroundTasks().add_task(coroutine)  # type: ignore[arg-type]
        # Left as it was: the app holds it (it may still await it), and Python warns if nobody does.
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED
        coroutine.close()
        with pytest.raises(TypeError, match="given a dict, which is not callable"):
            BackgroundTask({"not": "callable"})  # type: ignore[arg-type]
        gc.collect()

    made: list[Any] = []
    app = otel_bgtasks.instrument(bad_input_app(made))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/")
    assert response.status_code == 500  # Starlette's own answer to an exception in the route
    # Left to the app, which still holds it (as whoever keeps the route's traceback, Sentry say, may): never closed.
    assert [inspect.getcoroutinestate(c) for c in made] == [inspect.CORO_CREATED]
    made[0].close()


async def test_not_callable_never_logs_its_value(instrument: Any, caplog: pytest.LogCaptureFixture) -> None:
    instrument()
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        BackgroundTask({"password": "hunter2"})  # type: ignore[arg-type]
    assert "given a dict, which is not callable" in caplog.text
    assert "hunter2" not in caplog.text


async def test_dropped_tasks_are_counted_and_logged(
    instrument: Any, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        tasks = BackgroundTasks()
        tasks.add_task(ok)  # created here and never attached to a response
        tasks.add_task(never)
        del tasks
        gc.collect()

    messages = [r.getMessage() for r in caplog.records if "was never run" in r.getMessage()]
    assert len(messages) == 2 and any(f"{__name__}.ok was never run" in message for message in messages)
    assert all("test_task_health.py:" in message for message in messages)
    outcomes = {
        (
            dict(key)["code.function.name"],
            dict(key)["background_task.execution"],
            dict(key)["background_task.outcome"],
        ): (point.value)
        for key, point in points(metrics_by_name(reader)["background_task.outcomes"]).items()
    }
    # Each under the execution Starlette chose for it at creation (an async def is not a thread-pool task).
    assert outcomes == {(f"{__name__}.ok", "threadpool", "dropped"): 1, (f"{__name__}.never", "async", "dropped"): 1}


async def test_a_task_that_can_never_run_is_told_once_and_counted_dropped(
    instrument: Any, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    """``add_task(non_callable)``, never attached: an ERROR at the call, no "never run" WARNING, one outcome.

    Every task has exactly one outcome (issue 18): run, it is an ``error`` (Starlette's TypeError); left unrun
    after a failure, ``skipped``; freed unrun, ``dropped``, its mistake already told at the call.
    """
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        tasks = BackgroundTasks()
        tasks.add_task({"not": "callable"})  # type: ignore[arg-type]
        tasks.add_task(send_email("c@example.com"))  # type: ignore[arg-type]
        del tasks
        gc.collect()
    assert [r.levelname for r in caplog.records if r.name == "otel_bgtasks"] == ["ERROR", "ERROR"]
    assert counts(reader, "background_task.outcomes") == {
        ("dict", "threadpool", "dropped"): 1,
        ("send_email", "threadpool", "dropped"): 1,
    }


async def test_a_task_refused_in_strict_mode_has_no_outcome(
    instrument: Any, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    """``strict=True``: ``add_task`` raises, the app gets no task; the TypeError is the whole story."""
    instrument(strict=True)
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        tasks = BackgroundTasks()
        with pytest.raises(TypeError, match="not callable"):
            tasks.add_task({"not": "callable"})  # type: ignore[arg-type]
        del tasks
        gc.collect()
    assert "never run" not in caplog.text
    assert reader.get_metrics_data() is None


async def adds_a_follow_up(tasks: BackgroundTasks) -> None:
    tasks.add_task(ok)


async def test_a_task_dropped_in_a_reference_cycle_is_counted_by_uninstrument(
    instrument: Any, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    """``add_task(job, tasks=tasks)``, never attached: the task holds its BackgroundTasks, a reference cycle.

    Freed, and so known dropped, only when the cyclic garbage collector runs (here: never on its own). Once
    uninstrumented, a task freed unrun is not counted (it may have run unseen): uninstrument() collects first.
    """
    instrument()
    gc.disable()  # no automatic collection: only otel_bgtasks' own frees the cycle
    try:
        with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
            tasks = BackgroundTasks()
            tasks.add_task(adds_a_follow_up, tasks=tasks)
            del tasks
            assert reader.get_metrics_data() is None  # not known dropped yet: nothing is
            otel_bgtasks.uninstrument()
    finally:
        gc.enable()
    assert counts(reader, "background_task.outcomes") == {("adds_a_follow_up", "async", "dropped"): 1}
    (message,) = [r.getMessage() for r in caplog.records if "was never run" in r.getMessage()]
    assert f"{__name__}.adds_a_follow_up was never run" in message


_DROPPED_AT_EXIT = """
import gc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
from starlette.background import BackgroundTasks
import otel_bgtasks

class Outcomes(MetricExporter):
    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        for resource in metrics_data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "background_task.outcomes":
                        for point in metric.data.data_points:
                            print(point.attributes["background_task.outcome"], point.value, flush=True)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass

provider = MeterProvider([PeriodicExportingMetricReader(Outcomes(), export_interval_millis=3_600_000)])
otel_bgtasks.instrument(meter_provider=provider)

async def adds_a_follow_up(tasks):
    pass

gc.disable()  # no collection before exit: the cycle below is freed by nobody but otel_bgtasks
tasks = BackgroundTasks()
tasks.add_task(adds_a_follow_up, tasks=tasks)
del tasks
"""


def test_a_task_dropped_in_a_reference_cycle_is_in_the_last_export_at_exit() -> None:
    """At exit, before the provider's own shutdown exports a last time, the cycle is collected and counted."""
    done = subprocess.run([sys.executable, "-c", _DROPPED_AT_EXIT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dropped", "1"], done.stderr
    assert "__main__.adds_a_follow_up was never run" in done.stderr  # logging.lastResort: no handler configured


async def test_tasks_that_ran_or_were_skipped_are_not_dropped(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        tasks = BackgroundTasks([BackgroundTask(fail), BackgroundTask(never)])
        with pytest.raises(ValueError):
            await tasks()
        del tasks
        gc.collect()
    assert "never run" not in caplog.text
    assert "Skipped 1 background task(s)" in caplog.text


# -- Off the happy path: metrics --------------------------------------------------------------------


def counts(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, ...], Any]:
    """The points of observable counter ``name``: value by (bare function name, then other attribute values)."""
    metric = metrics_by_name(reader).get(name)
    if metric is None:
        return {}
    result: dict[tuple[str, ...], Any] = {}
    for key, point in points(metric).items():
        attributes = dict(key)
        function = str(attributes.pop(FUNC)).rsplit(".", 1)[-1]
        result[(function, *(str(attributes[k]) for k in sorted(attributes)))] = point.value
    return result


THREADS = 2
REQUESTS_PER_THREAD = 100
TASKS_PER_REQUEST = 50  # 10,000 tasks: racy counts lost some in about half the runs


async def test_counts_are_exact_with_event_loops_in_several_threads(reader: InMemoryMetricReader) -> None:
    """Each thread runs its own event loop serving requests, as several uvicorn workers in threads would."""
    # Spans off: the count updates are then a large share of each task's work, and a race shows sooner.
    otel_bgtasks.instrument(tracer_provider=trace.NoOpTracerProvider(), meter_provider=MeterProvider([reader]))
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)

    async def count_visit(visit: int) -> None:
        pass

    @app.get("/visit/{visit}")
    async def visit(visit: int, background_tasks: FastAPIBackgroundTasks) -> dict[str, int]:
        for _ in range(TASKS_PER_REQUEST):
            background_tasks.add_task(count_visit, visit)
        return {"visit": visit}

    together = threading.Barrier(THREADS)
    statuses: list[int] = []

    async def serve() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            together.wait(WAIT_SECONDS)
            responses = await asyncio.gather(*(client.get(f"/visit/{i}") for i in range(REQUESTS_PER_THREAD)))
        statuses.extend(r.status_code for r in responses)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a racy update shows sooner
    try:
        threads = [threading.Thread(target=asyncio.run, args=(serve(),)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_SECONDS)
    finally:
        sys.setswitchinterval(switch_interval)

    requests = THREADS * REQUESTS_PER_THREAD
    assert statuses == [200] * requests
    assert counts(reader, "background_task.outcomes") == {
        ("count_visit", "async", "success"): requests * TASKS_PER_REQUEST
    }
    assert counts(reader, "background_task.active") == {("count_visit", "async"): 0}


async def test_uninstrument_then_instrument_with_the_same_meter_provider_keeps_counting(
    tracer_provider: TracerProvider, reader: InMemoryMetricReader
) -> None:
    """The SDK hands back the instruments it has for a name: the counts behind them must stay live."""
    meter_provider = MeterProvider([reader])
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    await BackgroundTask(ok)()
    otel_bgtasks.uninstrument()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    release = asyncio.Event()
    started = asyncio.Event()

    async def long_running() -> None:
        started.set()
        await release.wait()

    await BackgroundTask(ok)()
    running = asyncio.ensure_future(BackgroundTask(long_running)())
    await started.wait()

    assert counts(reader, "background_task.outcomes") == {("ok", "threadpool", "success"): 2}
    assert counts(reader, "background_task.active") == {("ok", "threadpool"): 0, ("long_running", "async"): 1}
    release.set()
    await running
    assert counts(reader, "background_task.active") == {("ok", "threadpool"): 0, ("long_running", "async"): 0}


async def test_blocked_counts_async_tasks_that_held_the_loop(instrument: Any, reader: InMemoryMetricReader) -> None:
    """``background_task.blocked``: alert on it rather than on the WARNING, logged once per function."""
    instrument(blocking_threshold=0.05)

    async def resize_images() -> None:
        time.sleep(0.06)  # the classic mistake, and the time it holds the loop

    async def polite() -> None:
        await asyncio.sleep(0)

    for task in (resize_images, resize_images, polite):
        await BackgroundTask(task)()

    blocked = metrics_by_name(reader)["background_task.blocked"]
    assert blocked.unit == "{task}"
    assert [sorted(key) for key in points(blocked)] == [
        [("background_task.execution", "async"), (FUNC, resize_images.__module__ + "." + resize_images.__qualname__)]
    ]
    assert counts(reader, "background_task.blocked") == {("resize_images", "async"): 2}


async def test_skipped_warning_names_the_environment_variable_too(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Apps instrumented with ``opentelemetry-instrument`` never call ``instrument()``: tell them the variable."""
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"), pytest.raises(ValueError):
        await BackgroundTasks([BackgroundTask(fail), BackgroundTask(never)])()

    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped ")]
    assert "because an earlier task in the same BackgroundTasks failed" in warning
    assert "continue_on_error=True" in warning
    assert "OTEL_PYTHON_BGTASKS_CONTINUE_ON_ERROR=true" in warning


async def test_the_failure_is_logged_before_the_tasks_it_skipped(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Cause, then effect: the failed task's ERROR comes first, then the WARNING naming what it left unrun."""
    instrument()
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"), pytest.raises(ValueError):
        await BackgroundTasks([BackgroundTask(fail), BackgroundTask(never), BackgroundTask(never)])()

    told = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "otel_bgtasks"]
    told = [(level, text.split(":")[0]) for level, text in told if level == "ERROR" or text.startswith("Skipped")]
    assert told == [
        ("ERROR", f"Background task {fail.__module__}.fail failed (error)"),
        ("WARNING", "Skipped 2 background task(s) because an earlier task in the same BackgroundTasks failed"),
    ]


# -- Off the happy path: timeouts and delays ---------------------------------------------------------


async def test_sync_timeout_counts_from_the_start_on_a_worker_thread(
    instrument: Any, exporter: InMemorySpanExporter
) -> None:
    """A quick ``def`` task that waited for a worker longer than its timeout did not overrun it."""
    instrument()

    @otel_bgtasks.task_options(timeout=0.05)
    def quick() -> None:
        pass

    async with the_only_worker_thread_busy() as release:
        queued = asyncio.ensure_future(BackgroundTask(quick)())
        await asyncio.sleep(0.1)  # not synchronisation: the wait for a worker, twice the timeout
        release.set()
        await queued

    spans = {s.name.rsplit(".", 1)[-1]: s.attributes for s in task_spans(exporter)}
    quick_span = spans["quick"]
    assert quick_span is not None
    assert quick_span["background_task.threadpool.wait"] >= 0.1
    assert quick_span["background_task.timeout"] == 0.05
    assert quick_span["background_task.outcome"] == "success"


async def test_async_timeout_message_does_not_blame_threads(instrument: Any, exporter: InMemorySpanExporter) -> None:
    """An async task that never awaits cannot be cancelled either: the message says why, correctly."""
    instrument(timeout=0.02)

    async def crunch_numbers() -> None:
        time.sleep(0.05)  # holds the loop past the timeout: no await, so no cancellation

    await BackgroundTask(crunch_numbers)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.outcome"] == "timeout"
    message = str(span.status.description)
    assert "over its 0.02 s timeout" in message
    assert "sync task" not in message
    assert "thread" not in message


@pytest.mark.parametrize("timed", [True, False], ids=["event_loop_timed", "blocking_threshold_none"])
async def test_a_tasks_own_timeout_error_is_an_error_not_a_timeout(
    instrument: Any, exporter: InMemorySpanExporter, timed: bool
) -> None:
    instrument(timeout=30, **({} if timed else {"blocking_threshold": None}))

    async def calls_a_slow_service() -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)  # the task's own deadline, not ours

    def times_out_itself() -> None:
        raise TimeoutError("the SMTP server did not answer")

    for func in (calls_a_slow_service, times_out_itself):
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # one class from Python 3.11, two before
            await BackgroundTask(func)()

    # Before Python 3.11, asyncio.wait_for raises asyncio's own TimeoutError, not the builtin.
    wait_for_error = "TimeoutError" if asyncio.TimeoutError is TimeoutError else "asyncio.exceptions.TimeoutError"
    expected = {"calls_a_slow_service": wait_for_error, "times_out_itself": "TimeoutError"}
    for span in task_spans(exporter):
        assert span.attributes is not None
        assert span.attributes["background_task.outcome"] == "error"
        assert span.attributes["error.type"] == expected[span.name.rsplit(".", 1)[-1]]
        assert span.attributes["background_task.timeout"] == 30
        assert span.status.status_code is StatusCode.ERROR
        assert "timeout" not in str(span.status.description)
    assert len(task_spans(exporter)) == 2


async def test_queue_delay_is_in_seconds(
    instrument: Any, reader: InMemoryMetricReader, exporter: InMemorySpanExporter
) -> None:
    """Span attribute and histogram: at least the time the route held the task back, in seconds not ms."""
    instrument(queue_duration_metric=True)
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)

    @app.get("/")
    async def route(background_tasks: FastAPIBackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(ok)
        await asyncio.sleep(0.1)  # not synchronisation: the delay being measured (the task waits for the response)
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).json() == {"ok": True}

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert 0.1 <= span.attributes["background_task.queue.duration"] < 10  # in ms it would be >= 100
    (point,) = points(metrics_by_name(reader)["background_task.queue.duration"]).values()
    assert point.count == 1
    assert 0.1 <= point.sum < 10


class ChargeTask(BackgroundTask):
    """A subclass with its own ``__call__`` (FastAPI's tests have one) that fails before reaching Starlette's."""

    async def __call__(self) -> None:
        raise ValueError("card declined")


@pytest.mark.parametrize("continue_on_error", [False, True], ids=["default", "continue_on_error"])
async def test_queue_delay_of_a_failing_subclass_with_its_own_call_is_in_seconds(
    instrument: Any, reader: InMemoryMetricReader, exporter: InMemorySpanExporter, continue_on_error: bool
) -> None:
    instrument(queue_duration_metric=True, continue_on_error=continue_on_error)
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)

    @app.get("/")
    async def route(background_tasks: FastAPIBackgroundTasks) -> dict[str, bool]:
        background_tasks.tasks.append(ChargeTask(ok))
        await asyncio.sleep(0.1)  # not synchronisation: the delay being measured (the task waits for the response)
        return {"ok": True}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).json() == {"ok": True}

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.outcome"] == "error"
    assert span.attributes["error.type"] == "ValueError"
    assert 0.1 <= span.attributes["background_task.queue.duration"] < 10  # in ms it would be >= 100
    (point,) = points(metrics_by_name(reader)["background_task.queue.duration"]).values()
    assert point.count == 1
    assert point.sum == span.attributes["background_task.queue.duration"]


async def test_a_failed_or_timed_out_tasks_duration_is_in_seconds(
    instrument: Any, reader: InMemoryMetricReader, exporter: InMemorySpanExporter
) -> None:
    """The end of a run with something to report (not the short success path) records seconds too."""
    instrument()

    async def fails_after_200ms() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("no stock")

    @otel_bgtasks.task_options(timeout=0.2)
    async def hangs() -> None:
        await asyncio.Event().wait()

    with pytest.raises(ValueError):
        await BackgroundTask(fails_after_200ms)()
    with pytest.raises(TimeoutError):
        await BackgroundTask(hangs)()

    # Only this test's two: a task an earlier test left unrun may be reported as it is freed, at any time.
    ours = ("fails_after_200ms", "hangs")
    spans = {(s.attributes or {})["background_task.outcome"]: s for s in task_spans(exporter) if s.name.endswith(ours)}
    recorded = {
        dict(key)["background_task.outcome"]: point
        for key, point in points(metrics_by_name(reader)["background_task.duration"]).items()
        if str(dict(key)["code.function.name"]).endswith(ours)
    }
    assert sorted(recorded) == sorted(spans) == ["error", "timeout"]
    for outcome, point in recorded.items():
        span = spans[outcome]
        assert span.end_time is not None and span.start_time is not None
        assert point.count == 1
        assert point.sum == pytest.approx((span.end_time - span.start_time) / 1e9, abs=1e-6)
        assert 0.2 <= point.sum < 0.2 + 0.5  # seconds, not milliseconds


@pytest.fixture
def log_correlation() -> Iterator[None]:
    """OpenTelemetry's logging instrumentation injecting trace context into every record.

    What ``OTEL_PYTHON_LOG_CORRELATION=true`` turns on, without touching the root logger's format:
    ``inject_trace_context`` for newer releases (older ones always inject), no log export handler.
    """
    from opentelemetry.instrumentation.logging import LoggingInstrumentor

    instrumentor = LoggingInstrumentor()
    instrumentor.instrument(set_logging_format=False, inject_trace_context=True, enable_log_auto_instrumentation=False)
    try:
        assert logging.makeLogRecord({}).otelTraceID == "0"  # the record factory is in place
        yield
    finally:
        instrumentor.uninstrument()


@pytest.mark.parametrize("continue_on_error", [False, True], ids=["default", "continue_on_error"])
async def test_failure_records_keep_the_task_ids_with_log_correlation_on(
    instrument: Any,
    exporter: InMemorySpanExporter,
    log_correlation: None,
    caplog: pytest.LogCaptureFixture,
    continue_on_error: bool,
) -> None:
    """The record factory already sets otelTraceID: each failure's record still arrives, with the task's ids."""
    instrument(continue_on_error=continue_on_error)

    def fail_sync() -> None:
        raise ValueError("sync")

    tasks = BackgroundTasks([BackgroundTask(fail_sync), BackgroundTask(fail)])
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        with trace.get_tracer("tests").start_as_current_span("request"):
            if continue_on_error:
                await tasks()
            else:
                with pytest.raises(ValueError, match="sync"):
                    await tasks()
        with pytest.raises(ValueError, match="no stock"):
            await BackgroundTask(fail)()  # a task on its own, no span current around it

    failed = [s for s in task_spans(exporter) if s.attributes and s.attributes["background_task.outcome"] == "error"]
    assert len(failed) == (3 if continue_on_error else 2)
    # One record per failure, named after its task (not "otel_bgtasks failed internally"), with its ids.
    records = [r for r in caplog.records if r.name == "otel_bgtasks"]
    assert [(getattr(r, "background_task", r.getMessage()), r.otelTraceID, r.otelSpanID) for r in records] == [
        (
            s.attributes and s.attributes["code.function.name"],
            trace.format_trace_id(s.context.trace_id),
            trace.format_span_id(s.context.span_id),
        )
        for s in failed
    ]
