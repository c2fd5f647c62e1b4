"""``otel-bgtasks watch``: end to end, the console script around a real uvicorn serving a small app from tmp_path;
and its parts in this process: the OTLP round trip of real spans, and when a trace is ready to print.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from _collector import collector
from _servers import WAIT_SECONDS, closed_port
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from rich.console import Console
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import otel_bgtasks
from otel_bgtasks.cli.receiver import SpanReceiver, spans_from_proto
from otel_bgtasks.cli.trees import trace_tree
from otel_bgtasks.cli.watch import KEEP_SECONDS, PAUSE_SECONDS, QUIET_SECONDS, SETTLE_SECONDS, Traces

OTEL_BGTASKS = str(Path(sys.executable).parent / "otel-bgtasks")
WATCH_SECONDS = 30  # uvicorn's start under opentelemetry-instrument's sitecustomize, on 2 busy cores

FASTAPI_APP = """
from fastapi import BackgroundTasks, FastAPI

app = FastAPI()


def send_welcome_email(address: str) -> None:
    print(f"welcome e-mail to {address}")


async def charge_card(order: int) -> None:
    raise RuntimeError(f"card declined for order {order}")


def send_receipt(order: int) -> None:
    pass


@app.post("/signup")
async def signup(tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(send_welcome_email, "ada@example.com")
    return {"status": "welcome"}


@app.post("/order")
async def order(tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(charge_card, 7)
    tasks.add_task(send_receipt, 7)
    return {"status": "ordered"}
"""

# Plain Starlette has no request spans of its own: otel_bgtasks.instrument(app) adds them (so does
# opentelemetry-instrumentation-starlette under opentelemetry-instrument, but only from 0.55b0 on).
STARLETTE_APP = """
import time

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import otel_bgtasks


async def make_thumbnails(upload: int) -> None:
    time.sleep(0.15)  # blocks the event loop


async def upload(request: Request) -> JSONResponse:
    return JSONResponse({"upload": 3}, background=BackgroundTask(make_thumbnails, 3))


app = otel_bgtasks.instrument(Starlette(routes=[Route("/upload", upload, methods=["POST"])]))
"""


# -- Running it -------------------------------------------------------------------------------------


class Output:
    """What a process writes, read line by line in a thread, so that a test can wait for a line."""

    def __init__(self, read: Callable[[], bytes]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[], bytes]) -> None:
        pending = b""
        while chunk := read():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            with self._changed:
                # A terminal ends lines with \r\n; uvicorn colours its log levels there.
                self.lines.extend(re.sub(r"\x1b\[[0-9;]*m", "", line.decode().rstrip("\r")) for line in complete)
                self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1) -> None:
        """Until ``count`` lines contain ``text``."""
        with self._changed:
            found = self._changed.wait_for(lambda: sum(text in line for line in self.lines) >= count, WATCH_SECONDS)
        assert found, f"{count} x {text!r} not in:\n" + self.text()

    def close(self) -> list[str]:
        self._thread.join(WATCH_SECONDS)
        return self.lines

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


class Watch:
    """``otel-bgtasks watch -- python -m uvicorn app:app ...`` running in tmp_path."""

    def __init__(self, process: subprocess.Popen[bytes], output: Output, url: str, terminal: int | None) -> None:
        self.process = process
        self.output = output
        self.url = url
        self.terminal = terminal  # the controlling side of its terminal, when it runs in one

    def stop(self) -> int:
        """Ctrl-C: typed in its terminal, else SIGINT to the watch process; its exit status once it has exited."""
        if self.terminal is not None:
            os.write(self.terminal, b"\x03")  # the terminal signals its foreground process group
        else:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(WATCH_SECONDS)


def environment() -> dict[str, str]:
    # Wide enough that rich wraps no line; no OTEL_* setting of the caller's may change what is watched.
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    return {**env, "COLUMNS": "200"}


@contextmanager
def watching(
    tmp_path: Path, app: str, *uvicorn_args: str, watch_args: tuple[str, ...] = (), terminal: bool = False
) -> Iterator[Watch]:
    """Start the watch of a uvicorn serving ``app``; stop it if the test did not."""
    (tmp_path / "app.py").write_text(app)
    port = closed_port()
    argv = [OTEL_BGTASKS, "watch", *watch_args, "--", sys.executable, "-m", "uvicorn", "app:app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *uvicorn_args]
    controller = None
    if terminal:  # as run in a terminal: its session's controlling terminal, in the foreground
        process, output, controller = _in_terminal(argv, tmp_path)
    else:
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        stdout = process.stdout
        output = Output(lambda: stdout.read1(65536))
    watch = Watch(process, output, f"http://127.0.0.1:{port}", controller)
    try:
        yield watch
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(WATCH_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        output.close()
        if process.stdout is not None:
            process.stdout.close()
        if controller is not None:
            os.close(controller)


def _in_terminal(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], Output, int]:
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns, as COLUMNS says

    def take_terminal() -> None:  # in the new session: make the pty its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=environment(),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
        preexec_fn=take_terminal,  # one system call, no import: safe enough with the test's threads
    )
    os.close(terminal)

    def read() -> bytes:
        try:
            return os.read(controller, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            return b""

    return process, Output(read), controller


def tree(lines: list[str], header: str) -> list[str]:
    """The lines of the last tree whose first line starts with ``header``.

    The last: on a machine so busy that a task span comes more than PAUSE_SECONDS after its request's,
    the tree is printed a second time, complete (the unit tests below pin when trees are printed).
    """
    starts = [index for index, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no tree {header!r} in:\n" + "\n".join(lines)
    end = starts[-1] + 1
    if end < len(lines) and lines[end][:1] not in ("├", "└") and lines[end].strip():
        end += 1  # the header's note
    while end < len(lines) and lines[end][:1] in ("├", "└", "│", " ") and lines[end].strip():
        end += 1
    return lines[starts[-1] : end]


def line_in(lines: list[str], *parts: str) -> str:
    matches = [line for line in lines if all(part in line for part in parts)]
    assert len(matches) == 1, f"{parts} in {len(matches)} lines of:\n" + "\n".join(lines)
    return matches[0]


# -- End to end -------------------------------------------------------------------------------------


def test_fastapi_app(tmp_path: Path) -> None:
    with watching(tmp_path, FASTAPI_APP) as watch:
        watch.output.wait_for("Application startup complete")
        assert httpx.post(f"{watch.url}/signup").status_code == 200
        assert httpx.post(f"{watch.url}/order").status_code == 200
        watch.output.wait_for("BackgroundTask send_receipt  ⏭ skipped")
        watch.output.wait_for("BackgroundTask send_welcome_email  ✔ success")
        assert watch.stop() == 0
    lines = watch.output.close()

    signup = tree(lines, "POST /signup → 200")
    task = line_in(signup, "BackgroundTask send_welcome_email  ✔ success", "threadpool")
    assert re.search(r"  \d+\.\d ms  queued \d+\.\d ms  threadpool", task), task
    order = tree(lines, "POST /order → 200")
    charge = order.index(line_in(order, "BackgroundTask charge_card  ✘ error", "async"))
    assert "RuntimeError: card declined for order 7" in order[charge + 1]
    line_in(order, "BackgroundTask send_receipt  ⏭ skipped")
    # The app's own output passes through; uvicorn stopped as on Ctrl-C, its shutdown complete.
    line_in(lines, "welcome e-mail to ada@example.com")
    line_in(lines, "Application shutdown complete")


def test_starlette_app_spans_sent_on(tmp_path: Path) -> None:
    with (
        collector() as receiver,
        watching(tmp_path, STARLETTE_APP, watch_args=("--otlp-endpoint", receiver.endpoint)) as watch,
    ):
        watch.output.wait_for("Application startup complete")
        assert httpx.post(f"{watch.url}/upload").status_code == 200
        watch.output.wait_for("BackgroundTask make_thumbnails  ✔ success")
        assert watch.stop() == 0
    lines = watch.output.close()

    upload = tree(lines, "POST /upload → 200")
    task = upload.index(line_in(upload, "BackgroundTask make_thumbnails  ✔ success", "async"))
    assert "⚠ blocked the event loop for" in upload[task + 1]
    line_in(lines, f"Sending the spans on to {receiver.endpoint}/v1/traces")
    assert re.search(rf"Sent [1-9]\d* export requests on to {receiver.endpoint}/v1/traces\.", "\n".join(lines))
    assert {"POST /upload", "BackgroundTask make_thumbnails"} <= receiver.span_names()


def test_reload_worker_is_watched_and_ctrl_c_in_the_terminal_stops_it(tmp_path: Path) -> None:
    with watching(tmp_path, FASTAPI_APP, "--reload", terminal=True) as watch:
        watch.output.wait_for("Application startup complete")  # the worker uvicorn's reloader started
        assert httpx.post(f"{watch.url}/signup").status_code == 200
        watch.output.wait_for("BackgroundTask send_welcome_email  ✔ success")
        assert watch.stop() == 0  # Ctrl-C, typed in the terminal
    lines = watch.output.close()

    line_in(tree(lines, "POST /signup → 200"), "BackgroundTask send_welcome_email  ✔ success", "threadpool")
    line_in(lines, "welcome e-mail to ada@example.com")
    # The terminal signalled both uvicorn processes, and the reloader stopped its worker. (Whether that
    # worker's shutdown is graceful is uvicorn's race: 0.23's reloader may SIGTERM it before it has seen
    # its SIGINT, which it then takes as a second Ctrl-C. test_fastapi_app shows a forwarded Ctrl-C's.)
    line_in(lines, "Stopping reloader process")


def test_exit_status_is_the_commands(tmp_path: Path) -> None:
    def watch(*command: str) -> subprocess.CompletedProcess[str]:
        argv = [OTEL_BGTASKS, "watch", "--", *command]
        return subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60)

    assert watch(sys.executable, "-c", "raise SystemExit(3)").returncode == 3
    for signum in (signal.SIGKILL, signal.SIGTERM):  # killed by a signal: 128 + its number, as a shell says
        killed = watch(sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signum)})")
        assert killed.returncode == 128 + signum
    missing = watch("no-such-command-here")
    assert (missing.returncode, missing.stderr) == (
        127,
        "otel-bgtasks watch: command not found: no-such-command-here\n",
    )
    usage = subprocess.run([OTEL_BGTASKS, "watch"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    assert "say which command to run, e.g. otel-bgtasks watch -- uvicorn myapp:app --reload" in usage.stderr


def test_watch_terminated_stops_the_command_and_exits_as_it_was_killed(tmp_path: Path) -> None:
    """SIGTERM to the watch goes on to the command; a command that dies of it gives 128 + 15."""
    started = tmp_path / "started"
    command = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    watch = subprocess.Popen(
        [OTEL_BGTASKS, "watch", "--", sys.executable, "-c", command],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not started.exists():
            assert time.monotonic() < deadline and watch.poll() is None, "the command never started"
            time.sleep(0.05)
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=WAIT_SECONDS) == 128 + signal.SIGTERM
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


# -- Its parts --------------------------------------------------------------------------------------


def test_spans_survive_the_otlp_round_trip() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "GET /x", kind=SpanKind.SERVER, attributes={"http.response.status_code": 200}
    ) as request:
        request.add_event("background_task.enqueued", {"code.function.name": "app.work"})
    attributes: dict[str, Any] = {"s": "v", "b": True, "i": 3, "f": 0.5, "strings": ("a", "b"), "ints": (1, 2)}
    with tracer.start_as_current_span(
        "BackgroundTask work", links=[Link(request.get_span_context(), {"k": "v"})]
    ) as task:
        task.set_attributes(attributes)
        task.set_status(Status(StatusCode.ERROR, "it failed"))
    sent = exporter.get_finished_spans()

    received = list(spans_from_proto(encode_spans(sent)))

    def comparable(span: ReadableSpan) -> dict[str, Any]:
        return {
            "name": span.name,
            "context": (span.context.trace_id, span.context.span_id),
            "parent": span.parent and (span.parent.trace_id, span.parent.span_id),
            "kind": span.kind,
            "times": (span.start_time, span.end_time),
            "attributes": {key: tuple(v) if isinstance(v, list | tuple) else v for key, v in span.attributes.items()},
            "events": [(event.name, dict(event.attributes), event.timestamp) for event in span.events],
            "links": [(link.context.span_id, dict(link.attributes)) for link in span.links],
            "status": (span.status.status_code, span.status.description),
        }

    assert [comparable(span) for span in received] == [comparable(span) for span in sent]


@pytest.mark.parametrize("compression", list(Compression))
def test_receiver_takes_what_the_sdk_exporter_sends(compression: Compression) -> None:
    provider = TracerProvider()
    with SpanReceiver() as receiver:
        receiver.start()
        exporter = OTLPSpanExporter(endpoint=receiver.traces_url, compression=compression)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test").start_as_current_span("GET /x", kind=SpanKind.SERVER):
            pass
        (span,) = receiver.get(timeout=WATCH_SECONDS)
        provider.shutdown()
    assert (span.name, span.kind) == ("GET /x", SpanKind.SERVER)


async def request_spans(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, mode: str
) -> list[ReadableSpan]:
    """A real request's spans: two tasks queued, one run, one skipped after it failed."""
    app = FastAPI()

    def fail() -> None:
        raise ValueError("no")

    def never() -> None:
        pass

    @app.get("/two")
    async def two(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(fail)
        tasks.add_task(never)
        return {}

    transport = httpx.ASGITransport(app=otel_bgtasks.instrument(app, tracer_provider=tracer_provider, mode=mode))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(ValueError):
            await client.get("/two")
    return list(exporter.get_finished_spans())


async def test_child_mode_trace_is_printed_after_a_pause_and_again_when_a_task_ends_later(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    spans = await request_spans(tracer_provider, exporter, "child")
    late = task_spans_of(spans)[1]
    traces = Traces()
    traces.add([span for span in spans if span is not late], now=0)
    assert traces.ready(now=PAUSE_SECONDS * 0.9) == []
    ((printed, note),) = traces.ready(now=PAUSE_SECONDS * 1.1)
    assert (late in printed, len(printed), note) == (False, len(spans) - 1, None)
    assert traces.ready(now=5) == []  # printed once
    traces.add([late], now=10)
    ((printed, note),) = traces.ready(now=10 + PAUSE_SECONDS * 1.1)
    assert sorted(printed, key=id) == sorted(spans, key=id)
    assert note == "again, with what has ended since"
    # Kept KEEP_SECONDS: what ends after that prints on its own, said to be the rest of an earlier tree.
    assert traces.ready(now=10 + KEEP_SECONDS) == []
    traces.add([late], now=100)
    ((printed, note),) = traces.ready(now=100 + PAUSE_SECONDS * 1.1)
    assert render(printed)[0] == "Spans that ended late: their trace's tree was printed earlier"


async def test_link_mode_trace_is_printed_once_its_counted_tasks_have_ended(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    spans = await request_spans(tracer_provider, exporter, "link")
    tasks = task_spans_of(spans)
    assert len({span.context.trace_id for span in spans}) == 3  # the request's trace and one per task
    traces = Traces()
    traces.add([span for span in spans if span not in tasks], now=0)
    assert traces.ready(now=SETTLE_SECONDS * 1.1) == []  # its two tasks are still to come
    traces.add(tasks[:1], now=1)
    assert traces.ready(now=1 + SETTLE_SECONDS * 1.1) == []
    traces.add(tasks[1:], now=2)
    assert traces.ready(now=2 + SETTLE_SECONDS / 2) == []  # settling: one more linked trace may follow
    ((printed, note),) = traces.ready(now=2 + SETTLE_SECONDS * 1.1)  # one tree: the task traces folded in
    assert sorted(printed, key=id) == sorted(spans, key=id)
    assert note is None


async def test_link_mode_trace_waiting_for_its_tasks_says_so(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    spans = await request_spans(tracer_provider, exporter, "link")
    traces = Traces()
    traces.add([span for span in spans if span not in task_spans_of(spans)], now=0)
    assert traces.ready(now=QUIET_SECONDS * 0.9) == []
    ((_, note),) = traces.ready(now=QUIET_SECONDS * 1.1)
    assert note == "2 of its 2 queued tasks had not ended yet (still running, or never run)"


def test_a_trace_with_neither_request_nor_task_is_not_printed(tracer_provider: TracerProvider) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("connect"):
        pass
    traces = Traces()
    traces.add(exporter.get_finished_spans(), now=0)
    assert traces.ready(now=QUIET_SECONDS) == []
    assert traces.ready(now=0, final=True) == []


async def test_tasks_with_no_request_span_are_printed_on_their_own(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    def index_document(document: int) -> None:
        pass

    async def upload(request: Request) -> JSONResponse:
        return JSONResponse({}, background=BackgroundTask(index_document, 3))

    otel_bgtasks.instrument(tracer_provider=tracer_provider)  # tasks only: no request spans for the app
    transport = httpx.ASGITransport(app=Starlette(routes=[Route("/upload", upload, methods=["POST"])]))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.post("/upload")
    traces = Traces()
    traces.add(exporter.get_finished_spans(), now=0)

    ((spans, note),) = traces.ready(now=PAUSE_SECONDS * 1.1)

    lines = render(spans, note)
    assert lines[0].startswith("No request span: nothing traces this app's requests (call otel_bgtasks.instrument(app)")
    assert lines[1].startswith("└── BackgroundTask test_tasks_with_no_request_span_are_printed_on_their_own.<locals>")
    assert "✔ success" in lines[1]


def render(spans: list[ReadableSpan], note: str | None = None) -> list[str]:
    console = Console(file=io.StringIO(), width=200)
    console.print(trace_tree(spans, note=note))
    return cast(io.StringIO, console.file).getvalue().splitlines()


def task_spans_of(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [span for span in spans if span.name.startswith("BackgroundTask ")]
