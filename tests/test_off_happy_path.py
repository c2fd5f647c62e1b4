"""Off the happy path: tasks that queue more tasks, odd exceptions, odd task classes, odd arguments.

What a user sees in each case: every task that ran has one well-formed span (index, outcome, error), no
false "never run" WARNING, and no "otel_bgtasks failed internally" record.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import wrapt
from _servers import recording
from conftest import WITHOUT_NATIVE_TELEMETRY, task_spans
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

import otel_bgtasks

INTERNAL_ERROR = "otel_bgtasks failed internally"
NEVER_RUN = "never run"
MODES = pytest.mark.parametrize("continue_on_error", [False, True], ids=["default", "continue_on_error"])
pytestmark = pytest.mark.usefixtures("fresh_guard")  # each test sees its own once-per-place internal-error log


def app_queueing(queue: Callable[[BackgroundTasks], None]) -> FastAPI:
    """A FastAPI app whose ``GET /`` lets ``queue`` add tasks to the request's ``BackgroundTasks``."""
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        queue(background_tasks)
        return {"ok": True}

    return app


async def get(app: Any) -> httpx.Response:
    """One request; Starlette runs the tasks before the ASGI call returns."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/")


def by_function(spans: list[ReadableSpan]) -> dict[str, dict[str, Any]]:
    """Each task span's attributes, by the task function's bare name."""
    return {
        str(s.attributes["code.function.name"]).rsplit(".", 1)[-1]: dict(s.attributes) for s in spans if s.attributes
    }


# -- Tasks that queue tasks ---------------------------------------------------------------------------


@MODES
async def test_a_follow_up_task_added_by_a_task_runs_and_has_its_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, continue_on_error: bool
) -> None:
    """Starlette iterates the live list: a task may add a follow-up to its own ``BackgroundTasks``."""
    ran: list[str] = []

    def schedule_reminder() -> None:
        ran.append("reminder")

    def queue(background_tasks: BackgroundTasks) -> None:
        def send_welcome() -> None:
            ran.append("welcome")
            background_tasks.add_task(schedule_reminder)

        background_tasks.add_task(send_welcome)

    app = otel_bgtasks.instrument(
        app_queueing(queue), tracer_provider=tracer_provider, continue_on_error=continue_on_error
    )
    with recording("otel_bgtasks") as ours:
        assert (await get(app)).json() == {"ok": True}
        gc.collect()  # a follow-up lost on the way would be reported as never run here

    assert ran == ["welcome", "reminder"]
    spans = by_function(task_spans(exporter))
    assert set(spans) == {"send_welcome", "schedule_reminder"}
    assert spans["send_welcome"]["background_task.index"] == 0
    assert spans["schedule_reminder"]["background_task.index"] == 1
    assert all(s["background_task.outcome"] == "success" for s in spans.values())
    assert [r.getMessage() for r in ours.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("how", ["add_task", "tasks.append"])
async def test_background_tasks_queued_inside_another(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, how: str
) -> None:
    """A ``BackgroundTasks`` run as a task of another, or put in its list: every task numbered, nothing internal."""
    ran: list[str] = []

    def audit(what: str) -> None:
        ran.append(what)

    def queue(background_tasks: BackgroundTasks) -> None:
        inner = StarletteBackgroundTasks()
        inner.add_task(audit, "first")
        inner.add_task(audit, "second")
        background_tasks.add_task(audit, "outer")
        if how == "add_task":
            background_tasks.add_task(inner)
        else:
            background_tasks.tasks.append(inner)  # type: ignore[arg-type]  # Starlette runs it all the same

    app = otel_bgtasks.instrument(app_queueing(queue), tracer_provider=tracer_provider)
    with recording("otel_bgtasks") as ours:
        assert (await get(app)).json() == {"ok": True}

    assert ran == ["outer", "first", "second"]
    assert [r.getMessage() for r in ours.records if r.getMessage().startswith(INTERNAL_ERROR)] == []
    audits = [s.attributes for s in task_spans(exporter) if s.name.endswith(".audit") and s.attributes]
    assert len(audits) == 3
    assert all(a["background_task.outcome"] == "success" for a in audits)
    assert all("background_task.index" in a for a in audits)


# -- A BackgroundTask subclass with its own __call__ (FastAPI's own tests have one) --------------------


class RunsItsOwnWay(BackgroundTask):
    """Calls its function itself, never reaching ``BackgroundTask.__call__`` (no ``super()``)."""

    async def __call__(self) -> None:
        result = self.func(*self.args, **self.kwargs)
        if inspect.isawaitable(result):
            await result


class ReportRejected(Exception):
    pass


def build_report(ran: list[str]) -> None:
    ran.append("report")


async def reject_report() -> None:
    raise ReportRejected("quota exceeded")


async def test_subclass_with_its_own_call_is_not_reported_never_run(tracer_provider: TracerProvider) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    ran: list[str] = []
    with recording("otel_bgtasks") as ours:
        await RunsItsOwnWay(build_report, ran)()
        await StarletteBackgroundTasks([RunsItsOwnWay(build_report, ran)])()
        gc.collect()

    assert ran == ["report", "report"]
    assert [r.getMessage() for r in ours.records if NEVER_RUN in r.getMessage()] == []


@MODES
async def test_subclass_with_its_own_call_that_raises_records_its_real_error(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, continue_on_error: bool
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, continue_on_error=continue_on_error)
    ran: list[str] = []
    tasks = StarletteBackgroundTasks([RunsItsOwnWay(reject_report), BackgroundTask(build_report, ran)])

    if continue_on_error:
        await tasks()
    else:
        with pytest.raises(ReportRejected):
            await tasks()

    spans = {s.name.rsplit(".", 1)[-1]: s for s in task_spans(exporter)}
    assert set(spans) == {"BackgroundTask reject_report", "BackgroundTask build_report"}
    rejected = spans["BackgroundTask reject_report"]
    assert rejected.attributes is not None
    assert rejected.attributes["background_task.outcome"] == "error"
    assert rejected.attributes["error.type"] == f"{__name__}.ReportRejected"
    assert rejected.attributes["background_task.index"] == 0
    assert rejected.status.status_code is StatusCode.ERROR
    assert [e.name for e in rejected.events] == ["exception"]
    after = spans["BackgroundTask build_report"].attributes
    assert after is not None
    assert after["background_task.outcome"] == ("success" if continue_on_error else "skipped")
    assert ran == (["report"] if continue_on_error else [])


# -- Well-formed spans whatever the exception ------------------------------------------------------


class Unprintable(Exception):
    """An exception whose own ``__str__`` fails (a bug in a library's exception class)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


def fail_sync() -> None:
    raise ReportRejected("sync")


async def fail_async() -> None:
    raise ReportRejected("async")


async def fail_unprintable() -> None:
    raise Unprintable()


@pytest.mark.parametrize("task", [fail_sync, fail_async], ids=["sync", "async"])
async def test_exception_event_lies_within_the_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, task: Callable[[], Any]
) -> None:
    """Trace viewers draw an event stamped after the span's end outside the span."""
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with pytest.raises(ReportRejected):
        await BackgroundTask(task)()

    (span,) = task_spans(exporter)
    (event,) = [e for e in span.events if e.name == "exception"]
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= event.timestamp <= span.end_time


async def test_exception_whose_str_raises_still_gives_a_failed_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with pytest.raises(Unprintable):
        await BackgroundTask(fail_unprintable)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.outcome"] == "error"
    assert span.attributes["error.type"] == f"{__name__}.Unprintable"
    assert span.status.status_code is StatusCode.ERROR
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes is not None and "Unprintable" in str(event.attributes["exception.type"])


class KeyWithoutStr:
    """A dict key whose ``str()`` raises: rendering the argument it is in fails."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


async def test_argument_whose_rendering_fails_keeps_the_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """With capture_args=True: whatever rendering does with it, the task runs in one span that is ended."""
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    ran: list[str] = []

    def import_rows(rows: dict[object, int]) -> None:
        ran.append("imported")

    await BackgroundTask(import_rows, {KeyWithoutStr(): 1})()

    assert ran == ["imported"]
    (span,) = task_spans(exporter)
    assert span.end_time is not None and span.attributes is not None
    assert span.attributes["background_task.outcome"] == "success"


# -- Another library's wrapper around BackgroundTask.__call__ -----------------------------------------


@pytest.mark.parametrize("order", ["theirs_first", "ours_first", "theirs_over_contrib"])
async def test_another_librarys_call_wrapper_still_runs_once_per_task(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, order: str
) -> None:
    """otel_bgtasks runs a plain task's two Starlette lines itself only while nothing else wraps ``__call__``.

    Under ours (patched first) or over it, another library's wrapper sees every task once, and ours still
    times a ``def`` task's wait for the thread pool.
    """
    seen: list[str] = []

    def theirs(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen.append(instance.func.__name__)
        return wrapped(*args, **kwargs)

    def queue(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(send_receipt)
        background_tasks.add_task(resize_avatar)

    async def send_receipt() -> None:
        pass

    def resize_avatar() -> None:
        pass

    original = vars(BackgroundTask)["__call__"]
    marker = vars(BackgroundTask).get("_otel_original_call")
    contrib_app = FastAPI()
    try:
        if order == "theirs_over_contrib":
            # opentelemetry-instrumentation-fastapi patched __call__ first (once per process), then another
            # library wrapped its patch: ours bypasses contrib's bare span, never the library between.
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.instrument_app(contrib_app)
        if order in ("theirs_first", "theirs_over_contrib"):
            wrapt.wrap_function_wrapper(BackgroundTask, "__call__", theirs)
        app = otel_bgtasks.instrument(app_queueing(queue), tracer_provider=tracer_provider)
        if order == "ours_first":
            wrapt.wrap_function_wrapper(BackgroundTask, "__call__", theirs)
        with recording("otel_bgtasks") as ours:
            assert (await get(app)).json() == {"ok": True}
    finally:
        otel_bgtasks.uninstrument()
        if order == "theirs_over_contrib":
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.uninstrument_app(contrib_app)
        BackgroundTask.__call__ = original  # type: ignore[method-assign]
        if marker is not None:  # contrib's patch of an earlier test, as it was
            BackgroundTask._otel_original_call = marker  # type: ignore[attr-defined]
        elif "_otel_original_call" in vars(BackgroundTask):
            delattr(BackgroundTask, "_otel_original_call")

    assert seen == ["send_receipt", "resize_avatar"]
    spans = by_function(task_spans(exporter))
    assert set(spans) == {"send_receipt", "resize_avatar"}
    assert spans["resize_avatar"]["background_task.threadpool.wait"] >= 0
    assert spans["send_receipt"]["background_task.outcome"] == "success"
    assert [r.getMessage() for r in ours.records if r.levelno >= logging.WARNING] == []


# -- What Starlette's __call__ does, otel_bgtasks does: odd awaitables -------------------------------


async def _outcome(task: BackgroundTask) -> tuple[str, object]:
    try:
        return "returned", await task()
    except Exception as exc:
        return "raised", (type(exc), str(exc))


def _odd_tasks() -> list[BackgroundTask]:
    """Tasks flagged async whose function returns a Future, or something ``await`` refuses."""

    def future_soon() -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, 1)
        return future

    def not_awaitable() -> str:
        return "not awaitable"

    tasks = [BackgroundTask(future_soon), BackgroundTask(not_awaitable)]
    for task in tasks:
        task.is_async = True  # as a callable object Starlette mistook for async would be
    return tasks


async def test_odd_awaitables_end_as_uninstrumented(tracer_provider: TracerProvider) -> None:
    """A Future is awaited through; what ``await`` refuses raises the TypeError it raises uninstrumented."""
    uninstrumented = [await _outcome(task) for task in _odd_tasks()]
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with recording("otel_bgtasks") as ours:
        instrumented = [await _outcome(task) for task in _odd_tasks()]
    assert instrumented == uninstrumented
    assert uninstrumented[0] == ("returned", None)
    assert uninstrumented[1] == ("raised", (TypeError, "object str can't be used in 'await' expression"))
    assert [r.getMessage() for r in ours.records if r.getMessage().startswith(INTERNAL_ERROR)] == []
