"""The set-up warnings (otel_bgtasks/setup_checks.py): no SDK, or no span for the first task to belong to.

Each is logged once, at the first task after ``instrument()``. The no-SDK case needs a process whose
global tracer provider was never set (conftest sets this one's), so it runs a script in a subprocess:
plainly, and under ``opentelemetry-instrument`` with an exporter that is not installed, the way the
README's zero-code command once failed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import recording
from conftest import CONTRIB_GIVES_A_TRACER, needs_native_telemetry, task_spans
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks

NO_REQUEST_SPAN = "started with no span current where it was queued"
NO_SDK = "No OpenTelemetry SDK is set up"
INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"


def deliver(order: int) -> None:
    pass


async def route(request: Request) -> Response:
    return PlainTextResponse("ok", background=BackgroundTask(deliver, 7))


async def get_twice(app: Starlette) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(2):
            assert (await client.get("/")).status_code == 200


def warnings_in(records: list[logging.LogRecord], text: str) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_first_task_with_no_request_span_warns_once(exporter: InMemorySpanExporter) -> None:
    otel_bgtasks.instrument()  # tasks traced, but nothing traces this app's requests
    with recording("otel_bgtasks") as log:
        await get_twice(Starlette(routes=[Route("/", route)]))

    assert [span.parent for span in task_spans(exporter)] == [None, None]
    (warning,) = warnings_in(log.records, NO_REQUEST_SPAN)
    assert warning.startswith(f"Background task {__name__}.deliver {NO_REQUEST_SPAN}")
    assert "otel_bgtasks.instrument(app)" in warning
    assert "pip install 'opentelemetry-instrumentation-starlette>=0.55b0'" in warning
    assert warnings_in(log.records, NO_SDK) == []


async def test_no_warning_when_requests_are_traced(exporter: InMemorySpanExporter) -> None:
    app = otel_bgtasks.instrument(Starlette(routes=[Route("/", route)]))
    with recording("otel_bgtasks") as log:
        await get_twice(app)

    assert all(span.parent is not None for span in task_spans(exporter))
    assert [r.getMessage() for r in log.records if r.levelno >= logging.WARNING] == []


async def test_each_instrument_checks_its_first_task_again(exporter: InMemorySpanExporter) -> None:
    app = Starlette(routes=[Route("/", route)])
    with recording("otel_bgtasks") as log:
        for _ in range(2):
            otel_bgtasks.instrument()
            await get_twice(app)
            otel_bgtasks.uninstrument()
    assert len(warnings_in(log.records, NO_REQUEST_SPAN)) == 2


# -- No SDK: a process of its own ---------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import sys

    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import otel_bgtasks

    provider = None
    if sys.argv[1:] == ["given"]:
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider()


    def deliver(order):
        print("delivered", order)


    async def route(request):
        return PlainTextResponse("ok", background=BackgroundTask(deliver, 7))


    app = otel_bgtasks.instrument(Starlette(routes=[Route("/", route)]), tracer_provider=provider)


    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for _ in range(2):
                assert (await client.get("/")).status_code == 200


    asyncio.run(main())
    """
)


def run_script(
    tmp_path: Path, launcher: list[str], *args: str, source: str = SCRIPT, **env: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "no_sdk.py"
    script.write_text(source)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    completed = subprocess.run(
        [*launcher, str(script), *args],
        cwd=tmp_path,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("delivered 7") == 2  # the tasks ran all the same
    return completed


@pytest.mark.parametrize("under", ["python", "opentelemetry-instrument"])
def test_no_sdk_warns_once(tmp_path: Path, under: str) -> None:
    if under == "python":
        completed = run_script(tmp_path, [sys.executable])
    else:  # the SDK fails to start: an exporter it is told to use is not installed
        completed = run_script(
            tmp_path,
            [str(INSTRUMENT), sys.executable],
            OTEL_TRACES_EXPORTER="not_installed",
            OTEL_METRICS_EXPORTER="none",
            OTEL_LOGS_EXPORTER="none",
        )
        assert "Failed to auto initialize OpenTelemetry" in completed.stderr
    warnings = [line for line in completed.stderr.splitlines() if NO_SDK in line]
    assert len(warnings) == 1, completed.stderr
    assert "tracer_provider= to otel_bgtasks.instrument()" in warnings[0]
    assert "pip install 'otel_bgtasks[zero-code]' (released package) or pip install -e '.[zero-code]'" in warnings[0]
    assert NO_REQUEST_SPAN not in completed.stderr  # the cause is said, not its consequence


def test_no_sdk_warning_when_a_tracer_provider_is_given(tmp_path: Path) -> None:
    completed = run_script(tmp_path, [sys.executable], "given")
    assert NO_SDK not in completed.stderr
    assert NO_REQUEST_SPAN not in completed.stderr


# -- Whichever order the app's request tracing and instrument() come in ---------------------------------

ORDERS_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import json
    import sys

    import httpx
    from fastapi import BackgroundTasks, FastAPI
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    import otel_bgtasks

    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the app's own; the global one is never set
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    setup = sys.argv[1]
    if setup.startswith("native"):
        telemetry = {"tracer_provider": provider}
        if setup.endswith("no operation spans"):
            telemetry["operation_spans"] = False  # the request's server span creates the task
        app = FastAPI(telemetry=telemetry)
    else:
        app = FastAPI()


    def deliver(order):
        print("delivered", order)


    @app.get("/")
    async def route(background_tasks: BackgroundTasks):
        background_tasks.add_task(deliver, 7)
        return "ok"


    if setup == "native":
        app = otel_bgtasks.instrument(app)
    elif setup.startswith("native, no app"):
        otel_bgtasks.instrument()
    elif setup == "contrib first":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        otel_bgtasks.instrument(app)
    elif setup.startswith("contrib after"):
        otel_bgtasks.instrument(app if setup == "contrib after" else None)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    elif setup == "middleware first":
        app = otel_bgtasks.instrument(OpenTelemetryMiddleware(app, tracer_provider=provider))
    elif setup == "middleware first, then instrumented anew":
        otel_bgtasks.instrument(OpenTelemetryMiddleware(app, tracer_provider=provider))
        otel_bgtasks.uninstrument()
        app = otel_bgtasks.instrument(app)  # its own request spans, to the global provider: nowhere
    elif setup == "middleware after":
        otel_bgtasks.instrument()
        app = OpenTelemetryMiddleware(app, tracer_provider=provider)
    elif setup == "add_middleware first":
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
        otel_bgtasks.instrument(app)


    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for _ in range(2):
                assert (await client.get("/")).status_code == 200


    asyncio.run(main())
    spans = exporter.get_finished_spans()
    tasks = [s for s in spans if s.name == "BackgroundTask deliver"]
    print(json.dumps({
        "servers": sorted(s.context.span_id for s in spans if s.kind is SpanKind.SERVER),
        "task_parents": sorted(s.parent.span_id for s in tasks if s.parent),
        "exported": sorted(s.context.span_id for s in spans),
        "tasks": len(tasks),
        "fastapi_tasks": len([s for s in spans if s.name.startswith("fastapi.background_task")]),
    }))
    """
)
UNSEEN = "the request spans go to a tracer provider otel_bgtasks cannot see ("
FIX = "Pass the same provider as tracer_provider= to otel_bgtasks.instrument(), or call otel_bgtasks.instrument() first"


def run_order(tmp_path: Path, setup: str) -> tuple[dict[str, Any], list[str]]:
    completed = run_script(tmp_path, [sys.executable], setup, source=ORDERS_SCRIPT)
    told = [line for line in completed.stderr.splitlines() if NO_SDK in line or UNSEEN in line]
    assert NO_REQUEST_SPAN not in completed.stderr
    return json.loads(completed.stdout.splitlines()[-1]), told


@pytest.mark.parametrize(
    "setup",
    [
        "contrib after",
        "contrib after, no app",
        "middleware after",
        "add_middleware first",
        pytest.param("contrib first", marks=pytest.mark.skipif(CONTRIB_GIVES_A_TRACER, reason="a tracer only")),
    ],
)
def test_task_spans_follow_the_provider_the_request_middleware_is_given(tmp_path: Path, setup: str) -> None:
    """The middleware is made after instrument() (at the first request for add_middleware): its provider is seen."""
    spans, told = run_order(tmp_path, setup)
    assert spans["tasks"] == 2  # in the app's provider, the only one there is
    assert len(spans["servers"]) == 2
    assert spans["task_parents"] == spans["servers"]
    assert told == []


@needs_native_telemetry
@pytest.mark.parametrize("setup", ["native", "native, no app"])
def test_task_spans_follow_fastapis_native_telemetry_provider(tmp_path: Path, setup: str) -> None:
    """With the app or without (then the request FastAPI traces shows the provider when a task is queued)."""
    spans, told = run_order(tmp_path, setup)
    assert spans["tasks"] == 2
    assert len(spans["servers"]) == 2
    assert set(spans["task_parents"]) <= set(spans["exported"])  # FastAPI's endpoint span, under its server span
    assert told == []


@needs_native_telemetry
def test_task_spans_follow_fastapis_native_telemetry_provider_without_the_app_or_operation_spans(
    tmp_path: Path,
) -> None:
    """``instrument()`` without the app, FastAPI's operation spans off: the tasks are children of its request spans."""
    spans, told = run_order(tmp_path, "native, no app, no operation spans")
    assert spans["tasks"] == 2
    assert len(spans["servers"]) == 2
    assert spans["task_parents"] == spans["servers"]  # FastAPI's request spans
    assert spans["fastapi_tasks"] == 0  # ours instead of FastAPI's, as with instrument(app): one span per task
    assert told == []


@pytest.mark.parametrize(
    ("setup", "where"),
    [
        pytest.param(
            "contrib first",
            "(contrib's instrument_app(), called before otel_bgtasks.instrument(), hands its OpenTelemetryMiddleware "
            "a tracer, not the provider)",
            marks=pytest.mark.skipif(not CONTRIB_GIVES_A_TRACER, reason="given the provider: followed"),
        ),
        (
            "middleware first",
            "(an OpenTelemetryMiddleware in the app was made before otel_bgtasks.instrument(app) and keeps only a "
            "tracer)",
        ),
    ],
)
def test_a_provider_out_of_sight_is_named_with_the_fix(tmp_path: Path, setup: str, where: str) -> None:
    """Only a tracer was handed over: the provider cannot be followed, and the warning says so, not 'no SDK'."""
    spans, told = run_order(tmp_path, setup)
    assert spans["tasks"] == 0
    assert len(spans["servers"]) == 2  # the request spans do reach the app's provider
    (warning,) = told
    assert f"No OpenTelemetry SDK is set as the global one, and {UNSEEN}{where[1:]}, so background tasks' " in warning
    assert FIX in warning
    assert NO_SDK not in warning  # not the generic warning, untrue for the request spans


def test_an_earlier_instrumentations_provider_out_of_sight_is_not_this_ones(tmp_path: Path) -> None:
    """Instrumented anew, the app's requests traced by otel_bgtasks' own middleware: the plain no-SDK warning."""
    spans, told = run_order(tmp_path, "middleware first, then instrumented anew")
    assert spans == {"servers": [], "task_parents": [], "exported": [], "tasks": 0, "fastapi_tasks": 0}
    (warning,) = told
    assert warning.startswith(NO_SDK), warning
