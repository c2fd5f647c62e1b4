"""Zero-code instrumentation: ``opentelemetry-instrument`` finds otel_bgtasks through its entry point.

The subprocess tests run a real ``opentelemetry-instrument`` (opentelemetry-distro configures the SDK)
on a script that never mentions otel_bgtasks: it serves requests in-process (inside a "client" span,
or not) and prints, as JSON, the spans an in-memory exporter it adds to the global provider received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.starlette.package import _instruments as starlette_instruments

import otel_bgtasks

INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
# opentelemetry-instrument skips an instrumentation whose declared range excludes the installed library:
# opentelemetry-instrumentation-starlette before 0.55b0 declares Starlette 0.13 only.
STARLETTE_REQUEST_SPANS = get_dependency_conflicts(starlette_instruments) is None
STARLETTE_TOO_OLD = (
    f"opentelemetry-instrumentation-starlette {version('opentelemetry-instrumentation-starlette')} declares "
    f"{', '.join(starlette_instruments)}, not Starlette {version('starlette')}: request spans need 0.55b0 or newer"
)
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
    # opentelemetry-distro has installed the SDK provider before this script runs, unless it failed to.
    provider = trace.get_tracer_provider()
    if hasattr(provider, "add_span_processor"):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
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
        statuses = set()
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(int(sys.argv[4])):
                if sys.argv[3] == "client":
                    with tracer.start_as_current_span("client"):
                        statuses.add((await client.get("/")).status_code)
                else:
                    statuses.add((await client.get("/")).status_code)
        (status,) = statuses
        return status


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


def run_instrumented(
    tmp_path: Path, app_kind: str, *, client: bool = True, requests: int = 1, **env: str
) -> dict[str, Any]:
    """The script's result, plus its stderr under "stderr"."""
    script = tmp_path / "serve_one_request.py"
    script.write_text(SCRIPT)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FASTAPI_OTEL_"))}
    environ.update(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_SERVICE_NAME": "entry-point-test",
            **env,
        }
    )
    # The test extra installs opentelemetry-instrumentation-logging (for the log-correlation tests): loaded
    # here, it would route otel_bgtasks' WARNINGs to the OTel logs pipeline ("none") instead of stderr.
    disabled = environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
    environ["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = f"{disabled},logging" if disabled else "logging"
    completed = subprocess.run(
        [
            str(INSTRUMENT),
            sys.executable,
            str(script),
            app_kind,
            otel_bgtasks.__name__,
            "client" if client else "bare",
            str(requests),
        ],
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
    assert result["ran"] == [7] * requests
    assert len(result["creating"]) == requests
    result["stderr"] = completed.stderr
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

    # Its parent is the span current in the route: the request span of contrib's FastAPI or Starlette
    # instrumentation (opentelemetry-instrument loads those too; under the client span, because the request
    # is served in-process), or for Starlette with an instrumentation too old for it, the client span.
    (creating_id,) = result["creating"]
    (creator,) = [s for s in result["spans"] if s["span_id"] == creating_id]
    assert task["parent_id"] == creating_id
    assert task["trace_id"] == creator["trace_id"]
    if app_kind == "starlette" and not STARLETTE_REQUEST_SPANS:
        assert creator["name"] == "client"
    else:
        assert creator["name"] == "GET /"
        assert creator["parent_id"] == the_span(result, "client")["span_id"]
        assert not spans_named(result, "fastapi.background_task")
    assert "otel_bgtasks" not in result["stderr"]  # no set-up warning: there is a span to belong to


@pytest.mark.skipif(not STARLETTE_REQUEST_SPANS, reason=STARLETTE_TOO_OLD)
def test_plain_starlette_app_gets_request_spans(tmp_path: Path) -> None:
    result = run_instrumented(tmp_path, "starlette", client=False)
    task = the_span(result, "BackgroundTask deliver_order")
    (request,) = [s for s in result["spans"] if s["kind"] == "SERVER"]
    assert result["creating"] == [request["span_id"]]
    assert task["parent_id"] == request["span_id"]
    assert request["parent_id"] is None
    assert "no span current" not in result["stderr"]


def test_task_with_no_request_span_logs_one_warning_naming_what_to_install(tmp_path: Path) -> None:
    # What a plain Starlette app gets when nothing traces its requests (here: the instrumentation is off).
    result = run_instrumented(
        tmp_path, "starlette", client=False, requests=2, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="starlette"
    )
    tasks = spans_named(result, "BackgroundTask deliver_order")
    assert len(tasks) == 2
    assert all(task["parent_id"] is None for task in tasks)
    warnings = [line for line in result["stderr"].splitlines() if "no span current" in line]
    assert len(warnings) == 1, result["stderr"]
    assert warnings[0].startswith("Background task __main__.deliver_order started with no span current")
    assert "pip install 'opentelemetry-instrumentation-starlette>=0.55b0'" in warnings[0]
    assert "otel_bgtasks.instrument(app)" in warnings[0]
    assert "No OpenTelemetry SDK" not in result["stderr"]


def test_mode_from_environment_makes_task_span_a_linked_root(tmp_path: Path) -> None:
    # The client span creates the task and is still open when it runs, to take the link back; a
    # request span would have ended by then.
    result = run_instrumented(
        tmp_path, "starlette", OTEL_PYTHON_BGTASKS_MODE="link", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="starlette"
    )
    client = the_span(result, "client")
    task = the_span(result, "BackgroundTask deliver_order")
    assert result["creating"] == [client["span_id"]]

    assert task["parent_id"] is None
    assert task["trace_id"] != client["trace_id"]
    assert task["links"] == [{"trace_id": client["trace_id"], "span_id": client["span_id"]}]
    assert task["attributes"]["background_task.outcome"] == "success"
    # The creating span, still open while the task ran, points forward to the task's trace.
    assert {"trace_id": task["trace_id"], "span_id": task["span_id"]} in client["links"]
