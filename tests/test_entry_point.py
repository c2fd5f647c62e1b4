"""Zero-code instrumentation: ``opentelemetry-instrument`` finds otel_bgtasks through its entry point.

The subprocess tests run a real ``opentelemetry-instrument`` (opentelemetry-distro configures the SDK)
on a script that never mentions otel_bgtasks: it serves one request in-process and prints, as JSON,
the spans an in-memory exporter it adds to the global provider received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

import otel_bgtasks

INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
TIMEOUT_SECONDS = 60
MARKER = "SPANS-JSON:"

SCRIPT = textwrap.dedent(
    '''
    """Serve one request whose route queues a background task; print the spans as JSON."""

    import asyncio
    import json
    import sys

    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    # opentelemetry-distro has installed the SDK provider before this script runs.
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    tracer = trace.get_tracer("script")
    ran = []
    creating = []


    def deliver_order(order_id):
        ran.append(order_id)


    def remember_creating_span():
        creating.append(format(trace.get_current_span().get_span_context().span_id, "016x"))


    if sys.argv[1] == "starlette":
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def route(request):
            remember_creating_span()
            return PlainTextResponse("ok", background=BackgroundTask(deliver_order, 7))

        app = Starlette(routes=[Route("/", route)])
    else:
        from fastapi import BackgroundTasks, FastAPI

        app = FastAPI()

        @app.get("/")
        async def route(background_tasks: BackgroundTasks):
            remember_creating_span()
            background_tasks.add_task(deliver_order, 7)
            return {"ok": True}


    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with tracer.start_as_current_span("client"):
                response = await client.get("/")
        return response.status_code


    status = asyncio.run(main())


    def hex_id(value, width):
        return format(value, f"0{width}x")


    spans = [
        {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": hex_id(span.context.trace_id, 32),
            "span_id": hex_id(span.context.span_id, 16),
            "parent_id": hex_id(span.parent.span_id, 16) if span.parent else None,
            "attributes": dict(span.attributes or {}),
            "links": [
                {"trace_id": hex_id(link.context.trace_id, 32), "span_id": hex_id(link.context.span_id, 16)}
                for link in span.links
            ],
        }
        for span in exporter.get_finished_spans()
    ]
    result = {
        "status": status,
        "ran": ran,
        "creating": creating,
        "probe_imported": sys.argv[2] in sys.modules,
        "spans": spans,
    }
    print("MARKER" + json.dumps(result))
    '''
).replace("MARKER", MARKER)


def run_instrumented(tmp_path: Path, app_kind: str, **env: str) -> dict[str, Any]:
    script = tmp_path / "serve_one_request.py"
    script.write_text(SCRIPT)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    environ.update(
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="entry-point-test",
        **env,
    )
    completed = subprocess.run(
        [str(INSTRUMENT), sys.executable, str(script), app_kind, otel_bgtasks.__name__],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, (completed.stdout, completed.stderr)
    result: dict[str, Any] = json.loads(lines[0][len(MARKER) :])
    assert result["status"] == 200, completed.stderr
    assert result["ran"] == [7]
    assert len(result["creating"]) == 1
    return result


def spans_named(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [span for span in result["spans"] if span["name"] == name]


def the_span(result: dict[str, Any], name: str) -> dict[str, Any]:
    matches = spans_named(result, name)
    assert len(matches) == 1, [span["name"] for span in result["spans"]]
    return matches[0]


def test_script_does_not_use_otel_bgtasks() -> None:
    assert "bgtasks" not in SCRIPT.lower()


def test_entry_point_is_registered() -> None:
    (entry_point,) = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "background_tasks"]
    assert entry_point.value == "otel_bgtasks:BackgroundTasksInstrumentor"
    assert entry_point.load() is otel_bgtasks.BackgroundTasksInstrumentor


@pytest.mark.parametrize("app_kind", ["starlette", "fastapi"])
def test_opentelemetry_instrument_traces_tasks_without_code_changes(tmp_path: Path, app_kind: str) -> None:
    result = run_instrumented(tmp_path, app_kind)
    assert result["probe_imported"]

    task = the_span(result, "BackgroundTask deliver_order")
    assert [s for s in result["spans"] if s["name"].startswith("BackgroundTask")] == [task]
    assert task["kind"] == "INTERNAL"
    attributes = task["attributes"]
    assert attributes["code.function.name"] == "__main__.deliver_order"
    assert attributes["code.file.path"].endswith("serve_one_request.py")
    assert isinstance(attributes["code.line.number"], int)
    assert attributes["background_task.outcome"] == "success"
    assert attributes["background_task.execution"] == "threadpool"
    if app_kind == "fastapi":
        assert attributes["background_task.index"] == 0
    else:  # a lone BackgroundTask as the response's background, not in a BackgroundTasks
        assert "background_task.index" not in attributes
    assert task["links"] == []

    # Its parent is the span current in the route: the client span for bare Starlette (nothing else
    # traces it), contrib's request span for FastAPI (opentelemetry-instrument loads that too; it is
    # INTERNAL, under the client span, because the request is served in-process).
    (creating_id,) = result["creating"]
    (creator,) = [s for s in result["spans"] if s["span_id"] == creating_id]
    assert task["parent_id"] == creating_id
    assert task["trace_id"] == creator["trace_id"]
    if app_kind == "starlette":
        assert creator["name"] == "client"
    else:
        assert creator["name"] == "GET /"
        assert creator["parent_id"] == the_span(result, "client")["span_id"]
        assert not spans_named(result, "fastapi.background_task")


def test_disabled_instrumentation_gives_no_task_span(tmp_path: Path) -> None:
    result = run_instrumented(tmp_path, "starlette", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="background_tasks")
    assert not result["probe_imported"]
    # The SDK is configured and exporting (the client span is there), but no task span.
    assert len(spans_named(result, "client")) == 1
    assert [s["name"] for s in result["spans"] if s["name"].startswith("BackgroundTask")] == []
    assert all("background_task.outcome" not in s["attributes"] for s in result["spans"])


def test_mode_from_environment_makes_task_span_a_linked_root(tmp_path: Path) -> None:
    result = run_instrumented(tmp_path, "starlette", OTEL_PYTHON_BGTASKS_MODE="link")
    client = the_span(result, "client")
    task = the_span(result, "BackgroundTask deliver_order")
    assert result["creating"] == [client["span_id"]]

    assert task["parent_id"] is None
    assert task["trace_id"] != client["trace_id"]
    assert task["links"] == [{"trace_id": client["trace_id"], "span_id": client["span_id"]}]
    assert task["attributes"]["background_task.outcome"] == "success"
    # The creating span, still open while the task ran, points forward to the task's trace.
    assert {"trace_id": task["trace_id"], "span_id": task["span_id"]} in client["links"]
