"""Patching and unpatching, the one-liner's app handling, options, and never breaking a task."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import pytest
from conftest import task_spans
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette import background
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks
from otel_bgtasks.config import Options, resolve

ORIGINALS = {
    "BackgroundTask.__init__": vars(background.BackgroundTask)["__init__"],
    "BackgroundTask.__call__": vars(background.BackgroundTask)["__call__"],
    "BackgroundTasks.__call__": vars(background.BackgroundTasks)["__call__"],
}


def current_attributes() -> dict[str, Any]:
    return {
        "BackgroundTask.__init__": vars(background.BackgroundTask)["__init__"],
        "BackgroundTask.__call__": vars(background.BackgroundTask)["__call__"],
        "BackgroundTasks.__call__": vars(background.BackgroundTasks)["__call__"],
    }


def starlette_app(**kwargs: Any) -> Starlette:
    def work() -> None:
        pass

    async def route(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(work))

    return Starlette(routes=[Route("/", route)], **kwargs)


async def test_uninstrument_restores_every_patched_attribute_exactly(tracer_provider: TracerProvider) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    assert all(current_attributes()[name] is not original for name, original in ORIGINALS.items())
    assert hasattr(background.BackgroundTask, "_otel_original_call")

    otel_bgtasks.uninstrument()

    assert current_attributes() == ORIGINALS
    assert all(current_attributes()[name] is original for name, original in ORIGINALS.items())
    assert not hasattr(background.BackgroundTask, "_otel_original_call")


async def test_fastapi_override_is_restored(tracer_provider: TracerProvider) -> None:
    from fastapi import background as fastapi_background

    before = vars(fastapi_background.BackgroundTasks).get("__call__")
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    otel_bgtasks.uninstrument()
    assert vars(fastapi_background.BackgroundTasks).get("__call__") is before


async def test_instrument_twice_changes_nothing(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = starlette_app()
    assert otel_bgtasks.instrument(app, tracer_provider=tracer_provider) is app
    patched = current_attributes()
    middleware = list(app.user_middleware)

    assert otel_bgtasks.instrument(app, tracer_provider=tracer_provider, mode="link") is app

    assert current_attributes() == patched
    assert app.user_middleware == middleware
    with trace.get_tracer("tests").start_as_current_span("outer") as outer:
        await BackgroundTask(print, end="")()
    (span,) = task_spans(exporter)
    # Still child mode: the second call's options were ignored.
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id


async def test_instrument_app_adds_request_spans_once(tracer_provider: TracerProvider) -> None:
    app = starlette_app()
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    assert [m.cls for m in app.user_middleware] == [OpenTelemetryMiddleware]


async def test_instrument_app_keeps_existing_asgi_middleware(tracer_provider: TracerProvider) -> None:
    app = starlette_app(middleware=[Middleware(OpenTelemetryMiddleware)])
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    assert [m.cls for m in app.user_middleware] == [OpenTelemetryMiddleware]


async def test_plain_asgi_callable_is_wrapped(tracer_provider: TracerProvider) -> None:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        pass

    served = otel_bgtasks.instrument(asgi, tracer_provider=tracer_provider)
    assert isinstance(served, OpenTelemetryMiddleware)


async def test_instrument_after_start_warns_and_still_traces_tasks(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    app = starlette_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/")  # builds the middleware stack: Starlette now refuses add_middleware

        with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
            otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
        assert "before the app starts" in caplog.text

        await client.get("/")
    assert [s.name for s in task_spans(exporter)] == ["BackgroundTask starlette_app.<locals>.work"]


def test_unknown_option_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) colour; known options: .*\bmode\b"):
        otel_bgtasks.instrument(colour="blue")
    assert not otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry


def test_bad_mode_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'child', 'link', got 'sideways'"):
        otel_bgtasks.instrument(mode="sideways")


def test_options_from_environment_explicit_arguments_win(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve({}, {"OTEL_PYTHON_BGTASKS_MODE": "LINK"}) == Options(mode="link")
    assert resolve({"mode": "child"}, {"OTEL_PYTHON_BGTASKS_MODE": "link"}) == Options(mode="child")
    assert resolve({}, {}) == Options(mode="child")
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        assert resolve({}, {"OTEL_PYTHON_BGTASKS_MODE": "sideways"}) == Options(mode="child")
    assert "OTEL_PYTHON_BGTASKS_MODE='sideways'" in caplog.text
    assert "'child', 'link'" in caplog.text


class _BrokenTracer(trace.Tracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("tracer exploded")

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer exploded")


class _BrokenProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _BrokenTracer()


async def test_internal_failure_never_reaches_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """A broken tracer: tasks still run with their own results and exceptions; the error is logged once."""
    ran: list[int] = []

    def ok(n: int) -> None:
        ran.append(n)

    async def fail() -> None:
        raise LookupError("the user's own")

    otel_bgtasks.instrument(tracer_provider=_BrokenProvider())
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        await BackgroundTasks([BackgroundTask(ok, 1), BackgroundTask(ok, 2)])()
        with pytest.raises(LookupError, match="the user's own"):
            await BackgroundTask(fail)()

    assert ran == [1, 2]
    internal = [r for r in caplog.records if "failed internally" in r.getMessage()]
    assert len(internal) == 1  # once per place, not once per task
    assert "the background task itself is unaffected" in internal[0].getMessage()
    # The failure is still reported without a tracer.
    assert [r.getMessage() for r in caplog.records if "LookupError" in r.getMessage()] != []


async def test_concurrent_instrument_and_uninstrument_leave_a_clean_state(tracer_provider: TracerProvider) -> None:
    barrier = threading.Barrier(4)

    def flip() -> None:
        barrier.wait()
        for _ in range(50):
            otel_bgtasks.instrument(tracer_provider=tracer_provider)
            otel_bgtasks.uninstrument()

    threads = [threading.Thread(target=flip) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert current_attributes() == ORIGINALS
    assert not hasattr(background.BackgroundTask, "_otel_original_call")
