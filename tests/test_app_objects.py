"""What the app handles stays what it was, and a task whose body never ran is not a success (issue 18).

Each behaviour is checked against the same code run uninstrumented where what the app sees is the point:
objects (``copy``, ``deepcopy``, ``pickle``, ``vars()``), what a call with wrong arguments raises and when,
the exception Starlette and the server get, the app's own coroutine. Telemetry is read back from a real SDK.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import inspect
import logging
import pickle
import re
import warnings
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette import background
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks
from otel_bgtasks.testing import TaskRecorder
from tests._metrics import metrics_by_name, points
from tests.conftest import starlettes_refusal, task_spans

ran: list[str] = []


def job(value: str = "job") -> None:
    ran.append(value)


async def send_email(address: str) -> None:
    ran.append(f"email {address}")


def failing() -> None:
    raise ValueError("card declined")


@pytest.fixture(autouse=True)
def _clean_ran() -> Iterator[None]:
    ran.clear()
    yield
    ran.clear()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def instrument(tracer_provider: Any, reader: InMemoryMetricReader) -> Callable[..., None]:
    def instrument(**options: Any) -> None:
        otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]), **options)

    return instrument


def outcomes(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """``background_task.outcomes`` by (short function name, outcome)."""
    metric = metrics_by_name(reader)["background_task.outcomes"]
    return {
        (str(dict(key)["code.function.name"]).rpartition(".")[2], str(dict(key)["background_task.outcome"])): p.value
        for key, p in points(metric).items()
    }


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- objects the app handles -----------------------------------------------------------------------


def _task_objects() -> tuple[BackgroundTask, BackgroundTasks]:
    task = BackgroundTask(job, "a")
    tasks = BackgroundTasks()
    tasks.add_task(job, "b")
    return task, tasks


def _what_the_app_sees() -> list[Any]:
    task, tasks = _task_objects()
    seen: list[Any] = [sorted(vars(task)), sorted(vars(tasks)), sorted(vars(tasks.tasks[0]))]
    for obj in (task, tasks):
        for make in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
            made = make(obj)
            seen.append((type(made).__name__, sorted(vars(made))))
    return seen


async def test_copy_deepcopy_pickle_and_vars_as_uninstrumented(instrument: Callable[..., None]) -> None:
    uninstrumented = _what_the_app_sees()
    instrument()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a half-built copy's "Exception ignored in __del__" fails here too
        assert _what_the_app_sees() == uninstrumented
        gc.collect()


async def test_a_copy_carries_no_telemetry_state_and_runs_as_a_task_never_seen_made(
    instrument: Callable[..., None], exporter: InMemorySpanExporter, tracer_provider: Any
) -> None:
    instrument()
    with tracer_provider.get_tracer("t").start_as_current_span("request"):
        original = BackgroundTask(job, "copied")
    copied = copy.deepcopy(original)
    with tracer_provider.get_tracer("t").start_as_current_span("run") as run_span:
        await copied()
    (span,) = task_spans(exporter)
    assert ran == ["copied"]
    assert span.parent is not None and span.parent.span_id == run_span.get_span_context().span_id
    assert "background_task.queue.duration" not in attributes(span)  # not seen made: no queue time
    assert attributes(span)["background_task.outcome"] == "success"
    await original()  # the original keeps its own state
    assert "background_task.queue.duration" in attributes(task_spans(exporter)[1])


async def test_contribs_marker_is_not_left_on_background_task(instrument: Callable[..., None]) -> None:
    instrument()
    assert not hasattr(BackgroundTask, "_otel_original_call")
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    ours = vars(BackgroundTask)["__call__"]
    app = FastAPI()
    FastAPIInstrumentor.instrument_app(app)
    try:
        assert vars(BackgroundTask)["__call__"] is ours  # contrib left it alone, as when the marker stayed
        assert not hasattr(BackgroundTask, "_otel_original_call")
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    assert vars(BackgroundTask)["__call__"] is ours


# -- calls with wrong arguments: refused at the call ------------------------------------------------


def _wrong_calls() -> list[tuple[str, str]]:
    results: list[tuple[str, str]] = []
    for call in (
        lambda: BackgroundTask(job)("x"),  # type: ignore[call-arg]
        lambda: BackgroundTasks()("x"),  # type: ignore[call-arg]
        lambda: run_in_threadpool(),  # type: ignore[call-arg]
        lambda: background.run_in_threadpool(),  # type: ignore[call-arg]  # the name Starlette's __call__ uses
    ):
        try:
            returned = call()
        except TypeError as exc:
            results.append(("TypeError", str(exc)))
        else:
            returned.close()
            results.append(("returned", type(returned).__name__))
    return results


async def test_wrong_arguments_raise_at_the_call_as_uninstrumented(instrument: Callable[..., None]) -> None:
    uninstrumented = _wrong_calls()
    assert [kind for kind, _ in uninstrumented] == ["TypeError"] * 4
    instrument()
    assert _wrong_calls() == uninstrumented
    assert ran == []


async def test_a_task_call_is_a_real_coroutine_that_create_task_takes(
    instrument: Callable[..., None], exporter: InMemorySpanExporter
) -> None:
    instrument()
    await asyncio.create_task(BackgroundTask(job, "created")())
    tasks = BackgroundTasks()
    tasks.add_task(job, "listed")
    await asyncio.create_task(tasks())
    assert ran == ["created", "listed"]
    assert [attributes(s)["background_task.outcome"] for s in task_spans(exporter)] == ["success", "success"]


# -- add_task(coroutine object) and add_task(None) --------------------------------------------------


def awaiting_app() -> Starlette:
    async def route(request: Request) -> Response:
        tasks = BackgroundTasks()
        coroutine = send_email("a@example.com")
        tasks.add_task(coroutine)  # type: ignore[arg-type]  # the mistake, and then the app awaits it itself
        await coroutine
        return PlainTextResponse("sent", background=tasks)

    return Starlette(routes=[Route("/", route)])


async def _get(app: Starlette, raise_app_exceptions: bool = False) -> tuple[int | None, str, str | None]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        try:
            response = await client.get("/")
        except Exception as exc:
            return None, "", f"{type(exc).__name__}: {exc}"
    return response.status_code, response.text, None


async def test_a_coroutine_the_app_still_holds_is_never_closed(instrument: Callable[..., None]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nothing here is left unawaited, in either run
        uninstrumented = await _get(awaiting_app())
        uninstrumented_ran = list(ran)
        ran.clear()
        instrument()
        assert await _get(awaiting_app()) == uninstrumented == (200, "sent", None)
    assert ran == uninstrumented_ran == ["email a@example.com"]


def mistaken_app(func: Callable[[], Any]) -> Starlette:
    async def route(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(func())  # type: ignore[arg-type]  # the mistake: called, not passed
        return PlainTextResponse("queued", background=tasks)

    return Starlette(routes=[Route("/", route)])


@pytest.mark.parametrize("mistake", ["coroutine", "None"])
async def test_the_type_error_reaching_the_server_is_starlettes_own(
    instrument: Callable[..., None], mistake: str
) -> None:
    made: list[Any] = []  # the uninstrumented run's coroutine, closed here (else Python warns whenever it is freed)
    keep = [True]

    def make() -> Any:
        if mistake == "None":
            return None
        coroutine = send_email("b@example.com")
        if keep[0]:
            made.append(coroutine)
        return coroutine

    uninstrumented = await _get(mistaken_app(make), raise_app_exceptions=True)
    assert uninstrumented == (None, "", f"TypeError: {starlettes_refusal(mistake)}")  # its message, per release
    for coroutine in made:
        coroutine.close()
    keep[0] = False  # instrumented, only the task holds it
    instrument()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed when run, as only the task held it: no "never awaited"
        assert await _get(mistaken_app(make), raise_app_exceptions=True) == uninstrumented
        gc.collect()


# -- an async body that never ran -------------------------------------------------------------------


def plain_decorator(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def wraps_decorator(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


@plain_decorator
async def decorated() -> None:
    ran.append("decorated")


@wraps_decorator
async def decorated_with_wraps() -> None:
    ran.append("decorated_with_wraps")


async def method() -> None:
    ran.append("method")


class Jobs:
    method = staticmethod(method)


async def generator() -> AsyncGenerator[int, None]:
    ran.append("generator")
    yield 1


NEVER_RAN: dict[str, tuple[Any, str, bool]] = {
    # task, a fragment of the hint, whether Python warns "never awaited"
    "plain decorator": (decorated, "Make the decorator's wrapper async too", True),
    "functools.wraps": (decorated_with_wraps, "Make the decorator's wrapper async too", True),
    "raw staticmethod": (vars(Jobs)["method"], "raw staticmethod object", True),
    "async generator function": (generator, "async generator function", False),
}


def never_ran_app(task: Any) -> Starlette:
    async def route(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(task)
        tasks.add_task(job, "next")
        return PlainTextResponse("queued", background=tasks)

    return Starlette(routes=[Route("/", route)])


async def _run_recording_warnings(app: Starlette) -> tuple[tuple[int | None, str, str | None], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = await _get(app, raise_app_exceptions=True)
        gc.collect()
    return result, [str(w.message) for w in caught if "never awaited" in str(w.message)]


@pytest.mark.parametrize("kind", list(NEVER_RAN))
async def test_an_async_body_that_never_ran_is_the_add_task_mistake(
    instrument: Callable[..., None],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    task, hint, warns = NEVER_RAN[kind]
    uninstrumented = await _run_recording_warnings(never_ran_app(task))
    assert uninstrumented[0] == (200, "queued", None)  # Starlette drops what it returned: nothing fails
    assert bool(uninstrumented[1]) == warns
    assert ran == ["next"]
    ran.clear()

    instrument()
    with TaskRecorder() as recorder, caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        assert await _run_recording_warnings(never_ran_app(task)) == uninstrumented  # Python's warning as it was
    assert ran == ["next"]  # the next task still runs: nothing was raised into Starlette's loop

    first, second = task_spans(exporter)
    assert attributes(first)["background_task.outcome"] == "error"
    assert attributes(first)["error.type"] == "otel_bgtasks.mistakes.DiscardedCoroutineError"
    assert attributes(first)["background_task.diagnosis"] == "add_task_misuse"
    assert hint in (first.status.description or "")
    assert attributes(second)["background_task.outcome"] == "success"
    name = first.name.removeprefix("BackgroundTask ").rpartition(".")[2]
    assert outcomes(reader)[(name, "error")] == 1
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("Background task")]
    assert "DiscardedCoroutineError" in logged.getMessage() and hint in logged.getMessage()
    # The message is the hint: the line says it once and in full (not cut at 200 characters, then again).
    assert logged.getMessage().count(hint) == 1 and "…" not in logged.getMessage()
    (record,) = [r for r in recorder.records if r.outcome == "error"]
    assert record.diagnosis == "add_task_misuse" and record.hint is not None and hint in record.hint
    assert record in recorder.problems  # what strict mode fails a test for


# -- every task left unrun, one outcome each --------------------------------------------------------


async def test_a_coroutine_object_after_a_failure_is_skipped_and_counted(
    instrument: Callable[..., None],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    instrument()
    tasks = BackgroundTasks()
    tasks.add_task(failing)
    tasks.add_task(send_email("c@example.com"))  # type: ignore[arg-type]
    tasks.add_task(job)
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"), warnings.catch_warnings():
        warnings.simplefilter("error")  # left unrun and held by the task only: closed, no "never awaited"
        with pytest.raises(ValueError, match="card declined"):
            await tasks()
        del tasks
        gc.collect()
    spans = {s.name.rpartition(" ")[2]: attributes(s) for s in task_spans(exporter)}
    assert spans["send_email"]["background_task.outcome"] == "skipped"
    assert spans["send_email"]["background_task.index"] == 1
    assert spans["job"]["background_task.outcome"] == "skipped"
    counts = outcomes(reader)
    assert counts[("send_email", "skipped")] == 1 and counts[("job", "skipped")] == 1
    assert ("send_email", "dropped") not in counts
    assert "Skipped 2 background task(s)" in caplog.text


async def test_something_appended_by_hand_after_a_failure_is_skipped_and_left_untouched(
    instrument: Callable[..., None],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    fresh_guard: None,
) -> None:
    instrument()
    tasks = BackgroundTasks()
    tasks.add_task(failing)
    appended = functools.partial(job, "appended")
    tasks.tasks.append(appended)  # type: ignore[arg-type]  # Starlette's loop only does `await task()`
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"), pytest.raises(ValueError):
        await tasks()
    assert vars(appended) == {}
    assert "failed internally" not in caplog.text
    skipped = [attributes(s) for s in task_spans(exporter) if attributes(s)["background_task.outcome"] == "skipped"]
    assert [(a["code.function.name"], a["background_task.execution"]) for a in skipped] == [
        (f"{__name__}.job", "async")  # awaited on the event loop by Starlette's loop, had it got there
    ]
    assert outcomes(reader)[("job", "skipped")] == 1
    assert ran == []


async def _slow() -> None:
    await asyncio.sleep(30)


def test_a_task_whose_loop_closed_while_it_was_pending_is_cancelled(
    instrument: Callable[..., None],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    fresh_guard: None,
) -> None:
    instrument()
    loop = asyncio.new_event_loop()

    async def start() -> None:
        loop.create_task(BackgroundTask(_slow)())  # noqa: RUF006  # nobody keeps it, on purpose
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING):
        loop.run_until_complete(start())
        loop.close()
        gc.collect()  # the pending asyncio task is freed, and its coroutine closed
    (span,) = task_spans(exporter)
    assert attributes(span)["background_task.outcome"] == "cancelled"
    assert "error.type" not in attributes(span)
    assert outcomes(reader) == {("_slow", "cancelled"): 1}
    assert "failed internally" not in caplog.text
    assert "Failed to detach context" not in caplog.text
    assert [r.levelname for r in caplog.records if r.name == "otel_bgtasks"] == ["WARNING"]  # no request span


async def test_a_task_freed_while_pending_and_the_next_have_one_outcome_each(
    instrument: Callable[..., None],
    exporter: InMemorySpanExporter,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
    fresh_guard: None,
) -> None:
    instrument()
    never = [asyncio.get_running_loop().create_future()]

    async def waits() -> None:
        await never[0]

    async def start() -> None:
        tasks = BackgroundTasks()
        tasks.add_task(waits)
        tasks.add_task(job, "next")
        asyncio.get_running_loop().create_task(tasks())  # nobody keeps it, on purpose

    with caplog.at_level(logging.WARNING), TaskRecorder() as recorder:
        await start()
        await asyncio.sleep(0.01)  # it starts, and waits on a future that nobody else holds
        never.clear()
        gc.collect()  # asyncio's task, its coroutine and the BackgroundTasks are freed together
        told = [(r.name.rpartition(".")[2], r.outcome) for r in recorder.records]
    assert sorted(told) == [("job", "dropped"), ("waits", "cancelled")]  # the listeners too: one each
    counts = outcomes(reader)
    assert counts == {("waits", "cancelled"): 1, ("job", "dropped"): 1}
    assert [attributes(s)["background_task.outcome"] for s in task_spans(exporter)] == ["cancelled"]
    assert "failed internally" not in caplog.text
    assert "Skipped" not in caplog.text


async def test_a_coroutine_task_freed_unrun_is_closed_only_if_nothing_else_holds_it(
    instrument: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    instrument()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        warnings.simplefilter("error")  # Python's "never awaited" would fail here
        BackgroundTasks().add_task(send_email("d@example.com"))  # type: ignore[arg-type]  # freed at once
        gc.collect()
        held = send_email("e@example.com")
        BackgroundTasks().add_task(held)  # type: ignore[arg-type]
        gc.collect()
    assert inspect.getcoroutinestate(held) == inspect.CORO_CREATED  # the app's own, untouched
    await held
    assert ran == ["email e@example.com"]
    assert "was never run" not in caplog.text  # told at the add_task call: not a dropped task as well


async def test_a_coroutine_task_is_closed_as_it_runs_when_only_the_task_holds_it(
    instrument: Callable[..., None],
) -> None:
    """Closed before Starlette's TypeError, whose traceback holds it too.

    Without the close as it runs, test_diagnosis.py's coroutine-object test and the golden cause_add_task_misuse
    scenario leave a "never awaited" warning for a later test; here the close when the task is freed suffices.
    """
    instrument()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks = BackgroundTasks()
        tasks.add_task(send_email("f@example.com"))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=re.escape(starlettes_refusal("coroutine"))) as raised:
            await tasks()
        cycle: list[Any] = [raised.value, tasks]  # freed by the collector, the error's frames with the task
        cycle.append(cycle)
        del tasks, raised, cycle
        gc.collect()
