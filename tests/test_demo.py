"""``otel-bgtasks demo``, run as a user runs it: in its own process (the global tracer provider is
set once per process, and conftest already set this one's), against a real uvicorn server."""

from __future__ import annotations

import inspect
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from _collector import collector
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rich.console import Console

import otel_bgtasks
from otel_bgtasks.cli import demo_app
from otel_bgtasks.cli.trees import trace_tree

TASKS = (
    "send_welcome_email",
    "add_to_newsletter",
    "charge_card",
    "send_receipt",
    "build_report",
    "resize_images",
    "upload_export",
    "record_signup",
    "record_signup_in",
    "send_activity_digest",
    "sync_inventory",
)


# The console script, as README runs it; `python -m otel_bgtasks.cli` where a test needs no more.
OTEL_BGTASKS = str(Path(sys.executable).parent / "otel-bgtasks")


def run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    # Wide enough that rich wraps no line; no OTEL_* setting of the caller's may change the demo.
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["COLUMNS"] = "200"
    started = time.monotonic()
    result = subprocess.run(
        [OTEL_BGTASKS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], float]:
    return run_cli("demo", cwd=tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def lines(demo: tuple[subprocess.CompletedProcess[str], float]) -> list[str]:
    result, _ = demo
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def line_with(lines: list[str], *parts: str) -> int:
    matches = [index for index, line in enumerate(lines) if all(part in line for part in parts)]
    assert len(matches) == 1, f"{parts} in {len(matches)} lines of:\n" + "\n".join(lines)
    return matches[0]


def trees(lines: list[str]) -> list[str]:
    """The request trees: the lines before "Logged meanwhile" (whose ERROR lines repeat the errors' messages)."""
    return lines[: line_with(lines, "Logged meanwhile")]


def with_next(lines: list[str], index: int) -> str:
    """A line and the next one, which is where rich wraps a long line, without the tree guides."""
    return " ".join(f"{lines[index]} {lines[index + 1].lstrip(' │├└─')}".split())


def depth(line: str) -> int:
    """How deep in its tree a line is: where its text starts after the tree guides."""
    return len(line) - len(line.lstrip(" │├└─"))


def test_demo_is_quick_and_quiet(demo: tuple[subprocess.CompletedProcess[str], float]) -> None:
    result, _ = demo
    # A task that never ended fails the demo itself (non-zero exit, saying so): no wall-clock bound needed.
    assert result.returncode == 0, result.stdout + result.stderr
    # Failed tasks show as spans, not as uvicorn's or otel_bgtasks' tracebacks.
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


def test_importing_the_demo_app_creates_and_instruments_nothing() -> None:
    result = run_python(
        "import sys\n"
        "import otel_bgtasks.cli.demo_app\n"
        "from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor\n"
        "print(SQLAlchemyInstrumentor().is_instrumented_by_opentelemetry, 'aiosqlite' in sys.modules)\n"
    )
    # No engine: its driver, aiosqlite, is imported only when an engine is created.
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr


@pytest.mark.parametrize("argv", [["demo"], ["watch", "--", "true"]])
def test_without_the_demo_extra_the_command_says_what_to_install(argv: list[str]) -> None:
    result = run_python(
        "import sys\nsys.modules['rich'] = None  # as if not installed\n"
        f"from otel_bgtasks.cli import main\nraise SystemExit(main({argv!r}))\n"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    # rich.<module>: the first of rich's modules the command imports.
    expected = (
        r"otel-bgtasks needs the demo extra \(rich\.\w+ is missing\): pip install 'otel_bgtasks\[demo\]' "
        r"\(released package\) or pip install -e '\.\[demo\]' \(from a clone\)\n"
    )
    assert re.fullmatch(expected, result.stderr), result.stderr


def test_every_task_shows_with_its_outcome(lines: list[str]) -> None:
    outcomes = {
        "send_welcome_email": "✔ success",
        "charge_card": "✘ error",
        "send_receipt": "⏭ skipped",
        "resize_images": "✔ success",
        "record_signup_in": "✘ error",
        "send_activity_digest": "✘ error",
        "sync_inventory": "✘ error",
    }
    for task in TASKS:
        index = line_with(lines, f"BackgroundTask {task} ")
        assert outcomes.get(task, "success") in lines[index]


def test_failed_task_shows_error_type_and_message(lines: list[str]) -> None:
    task = line_with(lines, "BackgroundTask charge_card ")
    error = line_with(
        lines,
        "otel_bgtasks.cli.demo_app.PaymentDeclinedError: order 1042: card declined (insufficient funds) for 49.99 EUR",
    )
    assert error == task + 1
    assert depth(lines[error]) > depth(lines[task])


def test_task_after_the_failure_is_skipped(lines: list[str]) -> None:
    skipped = line_with(lines, "BackgroundTask send_receipt ", "skipped")
    assert skipped > line_with(lines, "BackgroundTask charge_card ")


def test_sync_route_task_nests_under_the_routes_span(lines: list[str]) -> None:
    request = line_with(lines, "GET /sync-route → 200")
    span = line_with(lines, "prepare export")
    task = line_with(lines, "BackgroundTask upload_export ")
    assert request < span < task
    assert task == span + 1
    assert depth(lines[task]) > depth(lines[span])


def test_database_cases(lines: list[str]) -> None:
    task = line_with(lines, "BackgroundTask record_signup ")
    insert = line_with(lines, "INSERT INTO audit_log")
    assert task < insert
    assert depth(lines[insert]) > depth(lines[task])
    line_with(trees(lines), "sqlalchemy.exc.InvalidRequestError: This Session has been permanently closed")


def test_orm_object_used_after_the_requests_session_closed(lines: list[str]) -> None:
    request = line_with(lines, "POST /digest → 200")
    task = line_with(lines, "BackgroundTask send_activity_digest ", "✘ error")
    error = line_with(trees(lines), "sqlalchemy.orm.exc.DetachedInstanceError: Parent instance <User at ")
    assert request < task < error
    handed_over = "⚠ given the request's database session or ORM objects: args[0] is an ORM object"
    # Under the task, before the next request's tree.
    assert error < line_with(lines, handed_over, "(otel_bgtasks.cli.demo_app.User)") < line_with(lines, "POST /follow")


def test_event_loop_conflict(lines: list[str]) -> None:
    request = line_with(lines, "POST /inventory → 200")
    task = line_with(lines, "BackgroundTask sync_inventory ", "✘ error", "async")
    error = line_with(trees(lines), "RuntimeError: asyncio.run() cannot be called from a running event loop")
    assert request < task < error
    # The coroutine handed to asyncio.run() never ran; Python's warning says so, among the logs, not on stderr.
    line_with(lines, "WARNING py.warnings: RuntimeWarning: coroutine 'fetch_stock' was never awaited")


def test_logged_errors_say_the_exceptions_message(lines: list[str]) -> None:
    logged = line_with(
        lines, "ERROR otel_bgtasks: Background task otel_bgtasks.cli.demo_app.charge_card failed (error)"
    )
    assert logged > line_with(lines, "Logged meanwhile")
    declined = "otel_bgtasks.cli.demo_app.PaymentDeclinedError: order 1042: card declined (insufficient funds)"
    assert declined in with_next(lines, logged)


def test_coroutine_object_instead_of_the_function(lines: list[str]) -> None:
    request = line_with(lines, "POST /follow → 200")
    warning = line_with(lines, "⚠ invalid task: add_task()/BackgroundTask() was given a coroutine object")
    assert request < warning < line_with(lines, "POST /inventory → 200")
    fix = "add_task(notify_followers, *args, **kwargs)"
    assert fix in with_next(lines, warning)
    logged = line_with(lines, "ERROR otel_bgtasks: add_task()/BackgroundTask() was given a coroutine object")
    assert fix in with_next(lines, logged)
    source, first = inspect.getsourcelines(demo_app.follow)
    line = first + next(i for i, text in enumerate(source) if "tasks.add_task(notify_followers(7))" in text)
    assert f"(at {demo_app.__file__}:{line})" in with_next(lines, logged)  # the route's line, not the server's


def test_recognised_failures_show_their_diagnosis(lines: list[str]) -> None:
    assert "diagnosis=event_loop_conflict" in lines[line_with(lines, "BackgroundTask sync_inventory ")]
    for task in ("record_signup_in", "send_activity_digest"):
        assert "diagnosis=session_outside_request" in lines[line_with(lines, f"BackgroundTask {task} ")]
    assert "diagnosis=" not in lines[line_with(lines, "BackgroundTask charge_card ")]  # the app's own error


def render(spans: Sequence[ReadableSpan]) -> list[str]:
    console = Console(file=io.StringIO(), width=200)
    console.print(trace_tree(spans, "200", "what it shows"))
    return cast(io.StringIO, console.file).getvalue().splitlines()


def test_tree_shows_the_diagnosis_of_a_failed_task() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /inventory", kind=SpanKind.SERVER, attributes={"url.path": "/inventory"}):
        task = {"background_task.outcome": "error", "background_task.execution": "async"}
        tracer.start_span("BackgroundTask fails_plainly", attributes=task).end()
        tracer.start_span(
            "BackgroundTask sync_inventory", attributes={**task, "background_task.diagnosis": "event_loop_conflict"}
        ).end()
    lines = render(exporter.get_finished_spans())
    assert lines[0].startswith("POST /inventory → 200")
    assert "diagnosis=event_loop_conflict" in lines[line_with(lines, "BackgroundTask sync_inventory ", "✘ error")]
    assert "diagnosis" not in lines[line_with(lines, "BackgroundTask fails_plainly ", "✘ error")]


def test_version() -> None:
    result = subprocess.run([OTEL_BGTASKS, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (0, f"otel-bgtasks {otel_bgtasks.__version__}\n")


def test_blocking_task_is_flagged(lines: list[str]) -> None:
    task = line_with(lines, "BackgroundTask resize_images ", "async")
    assert "blocked the event loop" in lines[task + 1]


def test_otlp_endpoint_receives_task_spans(tmp_path: Path) -> None:
    with collector() as receiver:
        result, _ = run_cli("demo", "--otlp-endpoint", receiver.endpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"to {receiver.endpoint}/v1/traces" in result.stdout
    assert "BackgroundTask" not in result.stdout  # sent, not printed

    assert receiver.received
    for resource_spans in receiver.resource_spans():
        service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
        assert service == "otel-bgtasks-demo"
    assert {f"BackgroundTask {task}" for task in TASKS} <= receiver.span_names()
