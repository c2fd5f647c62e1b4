"""A task's identity: every task function gets its own name, code.* attributes and options, whatever wraps it.

Functions wrapped by one decorator share the decorator's code object; builtins, classes, lru_cache
functions, mocks and coroutine objects have no ``__code__`` of their own. Each still says what ran.
"""

from __future__ import annotations

import functools
import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import pytest
from _tasks import Task, app_queueing, each_decorator, log_calls, log_calls_without_wraps, request
from conftest import task_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_bgtasks


def attributes_of(span: ReadableSpan) -> dict[str, Any]:
    assert span.attributes is not None
    return dict(span.attributes)


def spans_by_name(exporter: InMemorySpanExporter) -> dict[str, dict[str, Any]]:
    return {span.name: attributes_of(span) for span in task_spans(exporter)}


@each_decorator
async def test_functions_wrapped_by_one_decorator_keep_their_own_names_and_code(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, decorate: Callable[..., Any]
) -> None:
    def notify(user: str, text: str) -> None:
        pass

    def create_account(user: str, password: str) -> None:
        pass

    notify_task, create_task = decorate(notify), decorate(create_account)
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await request(app_queueing(lambda: [(notify_task, ("ann", "hi")), (create_task, ("ann", "pw"))]))

    spans = spans_by_name(exporter)
    assert sorted(spans) == ["BackgroundTask " + f.__qualname__ for f in (create_account, notify)]
    for func in (notify, create_account):
        attributes = spans["BackgroundTask " + func.__qualname__]
        assert attributes["code.function.name"] == f"{__name__}.{func.__qualname__}"
        assert attributes["code.file.path"] == __file__  # not functools' or tenacity's
        assert attributes["code.line.number"] == func.__code__.co_firstlineno
        assert attributes["background_task.outcome"] == "success"


async def test_task_options_timeout_stays_with_the_function_it_was_given_to(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @log_calls
    def unlimited() -> None:
        pass

    @otel_bgtasks.task_options(timeout=30)  # above the other decorator
    @log_calls
    def limited_outside() -> None:
        pass

    @log_calls
    @otel_bgtasks.task_options(timeout=5)  # below it: functools.wraps copies it onto the wrapper
    def limited_inside() -> None:
        pass

    @otel_bgtasks.task_options(timeout=20)
    @log_calls_without_wraps
    def limited_outside_plain() -> None:
        pass

    @log_calls_without_wraps
    @otel_bgtasks.task_options(timeout=10)  # below a decorator that copies nothing: found through its closure
    def limited_inside_plain() -> None:
        pass

    tasks: list[Task] = [(unlimited, ()), (limited_outside, ()), (limited_inside, ())]
    tasks += [(limited_outside_plain, ()), (limited_inside_plain, ())]
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await request(app_queueing(lambda: tasks))

    spans = spans_by_name(exporter)
    assert "background_task.timeout" not in spans[f"BackgroundTask {unlimited.__qualname__}"]
    assert spans[f"BackgroundTask {limited_outside.__qualname__}"]["background_task.timeout"] == 30
    assert spans[f"BackgroundTask {limited_inside.__qualname__}"]["background_task.timeout"] == 5
    local = "test_task_options_timeout_stays_with_the_function_it_was_given_to.<locals>"
    assert spans[f"BackgroundTask {local}.limited_outside_plain"]["background_task.timeout"] == 20
    assert spans[f"BackgroundTask {local}.limited_inside_plain"]["background_task.timeout"] == 10


class Job:
    """A class used as a task: what runs is its ``__init__``."""

    def __init__(self, order_id: int) -> None:
        self.order_id = order_id


@functools.lru_cache(maxsize=16)
def cached_lookup(key: str) -> str:
    return key.upper()


class SessionFactory:
    def __call__(self) -> None:
        pass


def run_with(factory: Callable[[], None]) -> Callable[..., None]:
    def run(*args: Any, **kwargs: Any) -> None:  # a wrapper's shape, but it closes over an object it calls
        factory()

    return run


class Notifier:
    def send(self, user: str) -> None:
        pass


factory_task = run_with(SessionFactory())


@pytest.mark.parametrize(
    ("func", "args", "span_name", "function_name", "code"),
    [
        (print, ("printed by a background task",), "BackgroundTask print", "builtins.print", None),
        (Job, (7,), "BackgroundTask Job", f"{__name__}.Job", Job.__init__.__code__),
        (
            cached_lookup,
            ("k",),
            "BackgroundTask cached_lookup",
            f"{__name__}.cached_lookup",
            cached_lookup.__wrapped__.__code__,
        ),
        (AsyncMock(), (1,), "BackgroundTask AsyncMock", "unittest.mock.AsyncMock", None),
        (MagicMock(), (1,), "BackgroundTask MagicMock", "unittest.mock.MagicMock", None),
        (
            log_calls_without_wraps(Notifier().send),
            ("ann",),
            "BackgroundTask Notifier.send",
            f"{__name__}.Notifier.send",
            Notifier.send.__code__,
        ),
        (
            factory_task,
            (),
            "BackgroundTask run_with.<locals>.run",
            f"{__name__}.run_with.<locals>.run",
            factory_task.__code__,
        ),
    ],
    ids=["builtin", "class", "lru_cache", "AsyncMock", "MagicMock", "method-without-wraps", "closure-over-object"],
)
async def test_names_say_what_ran(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    func: Any,
    args: tuple[Any, ...],
    span_name: str,
    function_name: str,
    code: Any,
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with caplog.at_level(logging.WARNING):
        await request(app_queueing(lambda: [(func, args)]))

    (span,) = task_spans(exporter)
    attributes = attributes_of(span)
    assert span.name == span_name
    assert attributes["code.function.name"] == function_name
    assert attributes["background_task.outcome"] == "success"
    if code is None:
        assert "code.file.path" not in attributes and "code.line.number" not in attributes
    else:
        assert (attributes["code.file.path"], attributes["code.line.number"]) == (code.co_filename, code.co_firstlineno)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []  # "Invalid type"


async def send_email(address: str) -> None:
    pass


async def test_a_coroutine_object_given_as_task_is_named_after_its_function(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        await request(app_queueing(lambda: [(send_email("ann@example.com"), ())]))  # the mistake
        gc.collect()

    (span,) = task_spans(exporter)
    assert span.name == "BackgroundTask send_email"
    assert attributes_of(span)["code.function.name"] == f"{__name__}.send_email"
    assert attributes_of(span)["code.line.number"] == send_email.__code__.co_firstlineno
    failure = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Background task"))
    assert failure.startswith(f"Background task {__name__}.send_email failed")


async def test_classes_and_closures_made_per_request_are_not_kept(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    made: list[weakref.ref[Any]] = []

    async def call(self: Any, user: str, token: str) -> None:
        pass

    # async tasks: an idle anyio < 4 worker thread keeps the context of its last job (so its task) until the next
    def make_tasks() -> list[Task]:
        async def closure(user: str, token: str) -> None:
            pass

        per_request = type("Handler", (), {"__call__": call})
        made.extend([weakref.ref(closure), weakref.ref(per_request)])
        return [(closure, ("ann", "t0k3n")), (per_request(), ("ann", "t0k3n"))]

    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    await request(app_queueing(make_tasks), times=20)
    gc.collect()

    spans = task_spans(exporter)
    assert len(spans) == 40
    assert {s.name for s in spans} == {
        "BackgroundTask Handler",
        f"BackgroundTask {make_tasks.__qualname__}.<locals>.closure",
    }
    assert all(attributes_of(s)["background_task.args"] == ("'ann'", "[redacted]") for s in spans)
    assert [ref for ref in made if ref() is not None] == []
