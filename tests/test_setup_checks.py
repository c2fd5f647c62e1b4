"""The set-up warnings (otel_bgtasks/setup_checks.py): no SDK, or no span for the first task to belong to.

Each is logged once, at the first task after ``instrument()``. The no-SDK case needs a process whose
global tracer provider was never set (conftest sets this one's), so it runs a script in a subprocess:
plainly, and under ``opentelemetry-instrument`` with an exporter that is not installed, the way the
README's zero-code command once failed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from _servers import recording
from conftest import needs_native_telemetry, task_spans
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


FOLLOWED_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import sys

    import httpx
    from fastapi import BackgroundTasks, FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_bgtasks

    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the app's own; the global one is never set
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if sys.argv[1] == "native":
        app = FastAPI(telemetry={"tracer_provider": provider})
    else:
        app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})


    def deliver(order):
        print("delivered", order)


    @app.get("/")
    async def route(background_tasks: BackgroundTasks):
        background_tasks.add_task(deliver, 7)
        return "ok"


    if sys.argv[1] == "native":
        app = otel_bgtasks.instrument(app)
    else:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        otel_bgtasks.instrument()
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)


    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for _ in range(2):
                assert (await client.get("/")).status_code == 200


    asyncio.run(main())
    tasks = [s for s in exporter.get_finished_spans() if s.name == "BackgroundTask deliver"]
    print("task spans", len(tasks), "children", sum(s.parent is not None for s in tasks))
    """
)


@pytest.mark.parametrize("given_to", [pytest.param("native", marks=needs_native_telemetry), "contrib instrument_app"])
def test_no_sdk_warning_when_task_spans_follow_the_apps_provider(tmp_path: Path, given_to: str) -> None:
    """The app gave FastAPI's telemetry or contrib's instrument_app() a provider: task spans go there too."""
    completed = run_script(tmp_path, [sys.executable], given_to.split()[0], source=FOLLOWED_SCRIPT)
    assert "task spans 2 children 2" in completed.stdout  # exported, under the request spans
    assert NO_SDK not in completed.stderr
    assert NO_REQUEST_SPAN not in completed.stderr
