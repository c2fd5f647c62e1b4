"""Patching and unpatching, the one-liner's app handling, options, and never breaking a task."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import httpx
import pytest
from _faults import TracerDownForOtelBgtasks
from conftest import ORIGINALS, assert_originals_restored, patch_state, task_spans
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


def starlette_app(**kwargs: Any) -> Starlette:
    def work() -> None:
        pass

    async def route(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(work))

    return Starlette(routes=[Route("/", route)], **kwargs)


async def test_uninstrument_restores_every_patched_attribute_exactly(tracer_provider: TracerProvider) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    patched = patch_state()
    assert [name for name, original in ORIGINALS.items() if original is not None and patched[name] is original] == []
    # contrib's marker is ours only while contrib's instrument_app() runs: the app never sees it.
    assert not hasattr(background.BackgroundTask, "_otel_original_call")

    otel_bgtasks.uninstrument()

    assert_originals_restored()


async def test_instrument_twice_changes_nothing(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = starlette_app()
    assert otel_bgtasks.instrument(app, tracer_provider=tracer_provider) is app
    patched = patch_state()
    middleware = list(app.user_middleware)

    assert otel_bgtasks.instrument(app, tracer_provider=tracer_provider, mode="link") is app

    assert patch_state() == patched
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
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        otel_bgtasks.instrument(colour="blue")  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    # The instrumentor takes **kwargs (opentelemetry-instrument passes its own): it names the known options.
    with pytest.raises(TypeError, match=r"unknown option\(s\) colour; known options: .*\bmode\b"):
        otel_bgtasks.BackgroundTasksInstrumentor().instrument(colour="blue")
    assert not otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry


def test_instrument_again_with_other_options_names_what_it_ignored(
    tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, mode="link", timeout=5)
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        otel_bgtasks.instrument(tracer_provider=tracer_provider, mode="link")  # the same: nothing to say
        assert caplog.records == []
        otel_bgtasks.instrument(mode="child", timeout=None, continue_on_error=True, tracer_provider=TracerProvider())
    (record,) = caplog.records
    message = record.getMessage()
    assert "ignoring" in message and "uninstrument()" in message
    for part in (
        "mode='child' (in effect: 'link')",
        "timeout=None (in effect: 5.0)",
        "continue_on_error=True",
        "tracer_provider=",
    ):
        assert part in message


def test_misspelt_environment_variable_names_the_closest_option(
    tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_BGTASKS_CONTINUE_ON_ERRORS", "true")
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        otel_bgtasks.instrument(tracer_provider=tracer_provider)
    assert "Ignoring OTEL_PYTHON_BGTASKS_CONTINUE_ON_ERRORS" in caplog.text
    assert "did you mean OTEL_PYTHON_BGTASKS_CONTINUE_ON_ERROR?" in caplog.text


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


SECONDS_OPTIONS = [("timeout", None), ("blocking_threshold", 0.1)]


@pytest.mark.parametrize(("option", "default"), SECONDS_OPTIONS)
@pytest.mark.parametrize("raw", ["0", "-1", "nan", "NaN", "inf", "abc", "true"])
async def test_a_bad_seconds_variable_is_logged_and_its_default_used(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    default: float | None,
    raw: str,
) -> None:
    variable = f"OTEL_PYTHON_BGTASKS_{option.upper()}"
    monkeypatch.setenv(variable, raw)
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        otel_bgtasks.instrument(tracer_provider=tracer_provider)
    (record,) = [r for r in caplog.records if variable in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"Ignoring {variable}={raw!r}: {option} must be a number of seconds greater than 0, or None to turn it off; "
        f"got {raw!r}. Using the default {default!r}."
    )
    assert otel_bgtasks.BackgroundTasksInstrumentor()._options == Options()  # pyright: ignore[reportPrivateUsage]

    # What the defaults do: no timeout (a NaN one would stop every async task), the loop held 0.3 s flagged.
    async def holds_the_loop() -> None:
        await asyncio.sleep(0.01)
        time.sleep(0.3)

    await BackgroundTask(holds_the_loop)()
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.outcome"] == "success"
    assert "background_task.timeout" not in span.attributes
    assert [e.name for e in span.events] == ["background_task.event_loop_blocked"]


@pytest.mark.parametrize(("option", "default"), SECONDS_OPTIONS)
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "abc", True])
def test_a_bad_seconds_argument_raises(option: str, default: float | None, value: object) -> None:
    message = f"{option} must be a number of seconds greater than 0, or None to turn it off; got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        otel_bgtasks.instrument(**{option: value})
    assert not otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry


@pytest.mark.parametrize(("option", "default"), SECONDS_OPTIONS)
def test_seconds_are_read_from_the_environment(option: str, default: float | None) -> None:
    variable = f"OTEL_PYTHON_BGTASKS_{option.upper()}"
    assert getattr(resolve({}, {}), option) == default
    assert getattr(resolve({}, {variable: " 2.5 "}), option) == 2.5
    assert getattr(resolve({}, {variable: "1e-3"}), option) == 0.001
    assert getattr(resolve({}, {variable: "off"}), option) is None
    assert getattr(resolve({}, {variable: "None"}), option) is None
    assert getattr(resolve({option: 7}, {variable: "2.5"}), option) == 7.0


def test_other_options_refuse_what_they_cannot_use(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve({"capture_args_max_length": 16}).capture_args_max_length == 16
    with pytest.raises(ValueError, match="capture_args_max_length must be a whole number of characters >= 16, got 15"):
        resolve({"capture_args_max_length": 15})
    with pytest.raises(ValueError, match=r"capture_args_max_length .* got True"):
        resolve({"capture_args_max_length": True})
    assert resolve({"sentry": "auto"}).sentry == "auto"
    assert resolve({}, {"OTEL_PYTHON_BGTASKS_SENTRY": " AUTO "}).sentry == "auto"
    assert resolve({}, {"OTEL_PYTHON_BGTASKS_SENTRY": "off"}).sentry is False
    with pytest.raises(ValueError, match="sentry must be 'auto', true or false, got 'maybe'"):
        resolve({"sentry": "maybe"})
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        assert resolve({}, {"OTEL_PYTHON_BGTASKS_CAPTURE_ARGS_MAX_LENGTH": "8"}) == Options()
    assert "Ignoring OTEL_PYTHON_BGTASKS_CAPTURE_ARGS_MAX_LENGTH='8'" in caplog.text


async def test_internal_failure_never_reaches_the_task(
    tracer_provider: TracerProvider, caplog: pytest.LogCaptureFixture, fresh_guard: None
) -> None:
    """A broken tracer: tasks still run with their own results and exceptions; the error is logged once."""
    ran: list[int] = []

    def ok(n: int) -> None:
        ran.append(n)

    async def fail() -> None:
        raise LookupError("the user's own")

    otel_bgtasks.instrument(tracer_provider=TracerDownForOtelBgtasks(tracer_provider))
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

    assert_originals_restored()


# -- Lazy patching: FastAPI and contrib are patched when imported, never imported by otel_bgtasks -----

LAZY_PRELUDE = textwrap.dedent(
    """
    import asyncio
    import json
    import sys

    import httpx
    import wrapt
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_bgtasks

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    NATIVE_OFF = {"tracing": False, "metrics": False, "logs": False}  # older FastAPI accepts and ignores it


    def work():
        pass


    def fastapi_app(telemetry):
        from fastapi import BackgroundTasks, FastAPI

        app = FastAPI(telemetry=telemetry)

        @app.get("/")
        async def route(background_tasks: BackgroundTasks):
            background_tasks.add_task(work)
            return {}

        return app


    def serve_one(app):
        # One request, tasks included; returns (name, code.function.name) of its spans.
        async def get():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/")).status_code == 200

        asyncio.run(get())
        spans = [(s.name, (s.attributes or {}).get("code.function.name")) for s in exporter.get_finished_spans()]
        exporter.clear()
        return spans


    def wrapped(owner, name):
        return isinstance(vars(owner).get(name), wrapt.FunctionWrapper)


    def fastapi_override():
        # FastAPI >= 0.163's own BackgroundTasks.__call__: older releases inherit or re-export Starlette's.
        from fastapi import background
        from starlette.background import BackgroundTasks

        if background.BackgroundTasks is not BackgroundTasks and "__call__" in vars(background.BackgroundTasks):
            return background.BackgroundTasks
        return None
    """
)
OUR_TASK_SPAN = ["BackgroundTask work", "__main__.work"]


def run_lazy(body: str) -> dict[str, Any]:
    """Run the prelude and ``body`` in a fresh interpreter; return the JSON ``body`` prints last."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    completed = subprocess.run(
        [sys.executable, "-c", LAZY_PRELUDE + textwrap.dedent(body)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "failed internally" not in completed.stderr, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def task_spans_of(spans: list[list[Any]]) -> list[list[Any]]:
    return [span for span in spans if span[0].startswith("BackgroundTask")]


def test_starlette_only_process_never_imports_fastapi() -> None:
    observed = run_lazy(
        """
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route


        async def route(request):
            return PlainTextResponse("ok", background=BackgroundTask(work))


        app = otel_bgtasks.instrument(Starlette(routes=[Route("/", route)]), tracer_provider=provider)
        spans = serve_one(app)
        otel_bgtasks.uninstrument()
        lazy = ("fastapi", "pydantic", "opentelemetry.instrumentation.fastapi")
        print(json.dumps({"spans": spans, "imported": [name for name in lazy if name in sys.modules]}))
        """
    )
    assert observed["imported"] == []
    assert task_spans_of(observed["spans"]) == [OUR_TASK_SPAN]


def test_fastapi_imported_after_instrument_gets_exactly_one_task_span() -> None:
    observed = run_lazy(
        """
        import inspect

        otel_bgtasks.instrument(tracer_provider=provider)
        assert "fastapi" not in sys.modules
        from fastapi import FastAPI

        override = fastapi_override()
        patched = override is not None and wrapped(override, "__call__")
        native = "telemetry" in inspect.signature(FastAPI).parameters
        app = fastapi_app({"tracer_provider": provider} if native else NATIVE_OFF)
        spans = serve_one(otel_bgtasks.instrument(app, tracer_provider=provider))
        otel_bgtasks.uninstrument()
        print(json.dumps({
            "override": override is not None,
            "patched": patched,
            "native": native,
            "spans": spans,
            "restored": override is None or not wrapped(override, "__call__"),
        }))
        """
    )
    # Only FastAPI >= 0.163 (native telemetry) overrides __call__, to open a fastapi.background_task span
    # around each task: the post-import hook must have wrapped it, leaving our span alone.
    assert observed["override"] == observed["native"]
    assert observed["patched"] == observed["override"]
    assert task_spans_of(observed["spans"]) == [OUR_TASK_SPAN]
    assert [name for name, _ in observed["spans"] if name == "fastapi.background_task"] == []
    assert observed["restored"]


def test_contrib_imported_after_instrument_keeps_exactly_one_task_span() -> None:
    observed = run_lazy(
        """
        otel_bgtasks.instrument(tracer_provider=provider)
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        watched = wrapped(FastAPIInstrumentor, "uninstrument_app")
        first = fastapi_app(NATIVE_OFF)
        FastAPIInstrumentor.instrument_app(first, tracer_provider=provider)
        with_contrib = serve_one(first)
        FastAPIInstrumentor.uninstrument_app(first)
        # Contrib's uninstrument_app() deleted its marker: applied again, it would add its bare span.
        second = fastapi_app(NATIVE_OFF)
        FastAPIInstrumentor.instrument_app(second, tracer_provider=provider)
        reapplied = serve_one(second)
        FastAPIInstrumentor.uninstrument_app(second)
        after = serve_one(otel_bgtasks.instrument(fastapi_app(NATIVE_OFF), tracer_provider=provider))
        otel_bgtasks.uninstrument()
        print(json.dumps({
            "watched": watched,
            "spans": [with_contrib, reapplied, after],
            "restored": isinstance(vars(FastAPIInstrumentor)["uninstrument_app"], staticmethod),
        }))
        """
    )
    assert observed["watched"]
    assert [task_spans_of(spans) for spans in observed["spans"]] == [[OUR_TASK_SPAN]] * 3
    assert observed["restored"]


def test_import_hooks_patch_only_while_instrumented() -> None:
    """Hooks outlive uninstrument(): a module imported then stays unpatched, and instrument() patches it."""
    observed = run_lazy(
        """
        otel_bgtasks.instrument(tracer_provider=provider)
        otel_bgtasks.uninstrument()
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        override = fastapi_override()


        def patched():
            fastapi_patched = override is not None and wrapped(override, "__call__")
            return [fastapi_patched, wrapped(FastAPIInstrumentor, "uninstrument_app")]


        uninstrumented = patched()
        otel_bgtasks.instrument(tracer_provider=provider)
        instrumented = patched()
        otel_bgtasks.uninstrument()
        print(json.dumps({"override": override is not None, "patched": [uninstrumented, instrumented, patched()]}))
        """
    )
    assert observed["patched"] == [[False, False], [observed["override"], True], [False, False]]
