"""Every shell command README.md and the examples' docstrings show: run as written, or listed with the reason.

Where the commands come from: README.md's ```bash blocks and the ``.. code-block:: bash`` blocks of the
docstrings of examples/*.py, one command a line (a line ending in a backslash goes on on the next). A
``curl`` line belongs to the server command before it in its block. A command that is neither run here
nor in ``NOT_RUN`` fails ``test_every_command_is_run_or_listed``: the docs cannot gain an untried command.

How they run: ``bash -c COMMAND``, the text as shown, from the repository root (``myapp:app``, the README's
placeholder for the reader's app, from a temporary folder holding a small FastAPI app of that name and
the README's test_myapp.py), in this process's environment minus every ``OTEL_*``, ``FASTAPI_OTEL_*`` and
``SENTRY_*`` variable, with this virtual environment's scripts first on PATH and PYTHONPATH set to the
repository, so that its code is what runs. Set-up steps (``python3 -m venv``, activating it, ``pip install``
of the project) are what made this environment: they are not run, but each extra they name must exist and
be installed here.

Servers: the only addition is UVICORN_PORT, a free port, which uvicorn takes as its ``--port`` (the
default, 8000, may be taken on a shared machine, and the servers run side by side). Each server gets the
request of its ``curl`` line, run as written but for the port (or, for the README's lines that have none,
the request in ``SERVERS``), then SIGINT (Ctrl+C: uvicorn waits for the background tasks), and its output
is checked: the console exporter's span JSON, or what arrived at an OTLP/gRPC receiver on
``localhost:4317``, where opentelemetry-distro's defaults send it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from packaging.requirements import Requirement
from test_real_stack import stack_bin

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_SECONDS = 60  # several servers importing FastAPI, SQLAlchemy and the SDK at once, on 2 busy cores
STOP_SECONDS = 30
OTLP_GRPC_DEFAULT = "127.0.0.1:4317"  # where opentelemetry-distro's defaults send everything (localhost)

# The README's placeholder app: a FastAPI app that never mentions otel_bgtasks (that is the point).
MYAPP = textwrap.dedent(
    """
    from fastapi import BackgroundTasks, FastAPI

    app = FastAPI()


    def send_welcome_email(address: str) -> None:
        print(f"welcome mail to {address}", flush=True)


    @app.post("/signup")
    async def signup(address: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_welcome_email, address)
        return {"status": "ok"}
    """
)


def readme_test_file() -> str:
    """The README's example test of the placeholder app (its pytest section), to run next to ``myapp.py``."""
    found = re.search(
        r"^```python\n# test_myapp.py\n(.*?)^```", (REPO / "README.md").read_text(), re.DOTALL | re.MULTILINE
    )
    assert found is not None, "README.md no longer shows test_myapp.py"
    return found.group(1)


# Lines no server's output may hold: the SDK failed to start, an instrumentation was skipped, or one of
# otel_bgtasks's set-up warnings (setup_checks.py) fired.
NEVER = (
    "Failed to auto initialize OpenTelemetry",
    "nothing can be instrumented",
    "Attempting to instrument while already instrumented",
    "No OpenTelemetry SDK is set up",
    "started with no span current",
    "Failed to export",
)


# -- The commands the docs show ---------------------------------------------------------------------


@dataclass
class Shown:
    """One command as the docs show it (continuation lines joined), with the curl lines that follow it."""

    command: str
    where: list[str] = field(default_factory=list)
    curls: list[str] = field(default_factory=list)


def _joined(lines: list[str]) -> Iterator[str]:
    """The block's commands: a line ending in a backslash goes on on the next (bash drops both)."""
    parts: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped and not parts:
            continue
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        yield " ".join(parts)
        parts = []
    assert not parts, f"a continuation line ends the block: {parts}"


def _docstring_blocks(text: str) -> Iterator[list[str]]:
    """The bodies of the docstring's ``.. code-block:: bash`` directives."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != ".. code-block:: bash":
            continue
        body: list[str] = []
        for following in lines[index + 1 :]:
            if following.strip() and not following.startswith(" "):
                break
            body.append(following)
        yield textwrap.dedent("\n".join(body)).strip("\n").splitlines()


def shell_blocks() -> Iterator[tuple[str, list[str]]]:
    """(where, lines) for each shell block of README.md and of the examples' docstrings."""
    for block in re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.DOTALL | re.MULTILINE):
        yield "README.md", block.splitlines()
    for path in sorted((REPO / "examples").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        for block in _docstring_blocks(docstring):
            yield f"examples/{path.name}", block


def shown_commands() -> dict[str, Shown]:
    """Every command, by its text; a command shown twice (README and a docstring) is one, run once."""
    shown: dict[str, Shown] = {}
    for where, lines in shell_blocks():
        server: Shown | None = None
        for command in _joined(lines):
            if command.startswith("curl ") and server is not None:
                server.curls.append(command)
                continue
            entry = shown.setdefault(command, Shown(command))
            entry.where.append(where)
            server = entry if "uvicorn " in command else None
    return shown


# -- Set-up steps: checked, not run -----------------------------------------------------------------

_SETUP_STEP = re.compile(r"^(python3 -m venv \S+|\. \S+/bin/activate|pip install .*)$")
_PROJECT_EXTRAS = re.compile(r"(?:otel_bgtasks|\.)\[([a-z0-9,-]+)\]")


def split_setup(command: str) -> tuple[list[str], str]:
    """The leading set-up steps of ``a && b && c``, and the rest ('' when it is all set-up)."""
    steps = command.split(" && ")
    count = 0
    while count < len(steps) and _SETUP_STEP.match(steps[count]):
        count += 1
    return steps[:count], " && ".join(steps[count:])


def requirements_of(extras: set[str]) -> list[Requirement]:
    """What installing otel_bgtasks with ``extras`` requires, the project's own extras expanded."""
    metadata = distribution("otel_bgtasks").metadata
    declared = set(metadata.get_all("Provides-Extra") or [])
    assert extras <= declared, f"no such extra: {sorted(extras - declared)} (the project has {sorted(declared)})"
    found: list[Requirement] = []
    seen: set[str] = set()
    pending = set(extras)
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for line in metadata.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
                continue
            if requirement.name.replace("-", "_") == "otel_bgtasks":
                pending |= set(requirement.extras) - seen
            else:
                found.append(requirement)
    return found


def assert_installed(step: str) -> None:
    """A ``pip install`` of the project: every extra it names exists, and all they require is installed.

    All but the ``dev`` extra's lint and typing tools, which only .ci/run's newest-releases environment has.
    """
    match = _PROJECT_EXTRAS.search(step)
    if match is None:
        assert step == "pip install -U pip", f"a set-up step this test does not know: {step}"
        return
    extras = set(match.group(1).split(","))
    if "dev" in extras:
        requirements_of(extras)  # it exists
        extras = (extras - {"dev"}) | {"test"}
    for requirement in requirements_of(extras):
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            raise AssertionError(f"{step}: {requirement} is not installed") from None
        assert requirement.specifier.contains(installed, prereleases=True), f"{step}: {requirement}, have {installed}"


# -- Spans, from the console exporter's JSON or from OTLP ----------------------------------------------


@dataclass(frozen=True)
class Span:
    name: str
    kind: str  # SERVER, INTERNAL, CLIENT, ...
    trace_id: str
    span_id: str
    parent_id: str | None
    status: str  # UNSET, OK, ERROR
    attributes: dict[str, Any]
    links: tuple[str, ...]  # the span ids it links to

    @classmethod
    def from_console(cls, data: dict[str, Any]) -> Span:
        parent = data.get("parent_id")
        return cls(
            name=data["name"],
            kind=data["kind"].rpartition(".")[2],
            trace_id=data["context"]["trace_id"].removeprefix("0x"),
            span_id=data["context"]["span_id"].removeprefix("0x"),
            parent_id=parent.removeprefix("0x") if parent else None,
            status=data["status"]["status_code"],
            attributes=data.get("attributes") or {},
            links=tuple(link["context"]["span_id"].removeprefix("0x") for link in data.get("links") or ()),
        )

    @classmethod
    def from_otlp(cls, span: SpanProto) -> Span:
        return cls(
            name=span.name,
            kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex() or None,
            status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
            attributes={pair.key: _scalar(pair.value) for pair in span.attributes},
            links=tuple(link.span_id.hex() for link in span.links),
        )


def _scalar(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def console_spans(stdout: str) -> list[Span]:
    """The spans ConsoleSpanExporter printed (one indented JSON object each), among whatever else was printed."""
    decoder = json.JSONDecoder()
    spans: list[Span] = []
    for match in re.finditer(r"^\{$", stdout, re.MULTILINE):
        try:
            data, _ = decoder.raw_decode(stdout, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "context" in data:
            spans.append(Span.from_console(data))
    return spans


class Trees:
    """The spans of one run, and the questions the checks ask of them."""

    def __init__(self, spans: list[Span], output: str) -> None:
        self.spans = spans
        self.by_id = {span.span_id: span for span in spans}
        self.output = output  # for assertion messages

    def request(self, marker: str) -> Span:
        """The one SERVER span whose route, path or query holds ``marker``."""
        matches = [
            span
            for span in self.spans
            if span.kind == "SERVER" and any(marker in str(value) for value in span.attributes.values())
        ]
        assert len(matches) == 1, f"{len(matches)} request spans for {marker!r}: {self.names()}\n{self.output}"
        return matches[0]

    def task(self, function: str) -> Span:
        matches = [span for span in self.spans if span.name == f"BackgroundTask {function}"]
        assert len(matches) == 1, f"{len(matches)} spans for task {function}: {self.names()}\n{self.output}"
        return matches[0]

    def under(self, span: Span, ancestor: Span) -> bool:
        while span.parent_id is not None and span.parent_id in self.by_id:
            span = self.by_id[span.parent_id]
            if span is ancestor:
                return True
        return False

    def names(self) -> list[str]:
        return [span.name for span in self.spans]


# -- An OTLP/gRPC receiver on the default endpoint --------------------------------------------------


class Received:
    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def spans(self) -> list[Span]:
        with self.lock:
            return [
                Span.from_otlp(span)
                for request in self.traces
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:
        with self.received.lock:
            self.received.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return logs_service_pb2.ExportLogsServiceResponse()


@contextmanager
def otlp_grpc_receiver() -> Iterator[Received]:
    """Traces, metrics and logs accepted on 127.0.0.1:4317; the traces kept."""
    received = Received()
    # SO_REUSEPORT off: with it (gRPC's default) a second receiver on the port would share its traffic.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(), server)
    try:
        bound = server.add_insecure_port(OTLP_GRPC_DEFAULT)
    except RuntimeError:
        bound = 0
    assert bound, f"{OTLP_GRPC_DEFAULT} is taken: the README's commands export there by default"
    server.start()
    try:
        yield received
    finally:
        server.stop(grace=None)


# -- Running a command ------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FASTAPI_OTEL_", "SENTRY_"))}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = str(REPO)
    # opentelemetry-instrumentation-logging (of the test extra) stays on: its handler on the root logger sends
    # records to the logs pipeline, and otel_bgtasks' hints must reach the terminal all the same.
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ran:
    """What one command printed, and the output of the curl lines sent to it."""

    command: str
    returncode: int
    stdout: str
    stderr: str
    replies: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return f"$ {self.command}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_once(command: str, cwd: Path) -> Ran:
    completed = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=START_SECONDS + STOP_SECONDS,
        check=False,
    )
    return Ran(command, completed.returncode, completed.stdout, completed.stderr)


def run_server(command: str, cwd: Path, requests: list[str], logs: Path) -> Ran:
    """Start the server command, run each request (a curl line) against it, stop it with SIGINT.

    The free port is free when chosen, not necessarily when the server binds it: another process (a server of
    an earlier test, a client's ephemeral port) may take it in between, and then the server exits with
    "[Errno 98] ... address already in use" while something else answered. Then it runs again on another port.
    """
    for _ in range(3):
        ran = _run_server_once(command, cwd, requests, logs)
        if not (ran.returncode != 0 and "[Errno 98]" in ran.stderr):
            break
    return ran


def _run_server_once(command: str, cwd: Path, requests: list[str], logs: Path) -> Ran:
    port = free_port()
    stdout_log, stderr_log = logs / f"{port}.out", logs / f"{port}.err"
    with stdout_log.open("wb") as stdout, stderr_log.open("wb") as stderr:
        process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env={**environment(), "UVICORN_PORT": str(port)},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # SIGINT to its process group, as Ctrl+C in a terminal
        )
    replies: list[str] = []
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _listening(port):
            assert process.poll() is None, f"exited with {process.returncode}: {stderr_log.read_text()}"
            assert time.monotonic() < deadline, f"not listening after {START_SECONDS}s: {stderr_log.read_text()}"
            time.sleep(0.05)
        for curl in requests:
            reply = subprocess.run(
                ["bash", "-c", curl.replace("localhost:8000", f"localhost:{port}")],
                capture_output=True,
                text=True,
                timeout=STOP_SECONDS,
                check=False,
            )
            assert reply.returncode == 0, f"{curl}: {reply.stderr}"
            replies.append(reply.stdout)
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(STOP_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_SECONDS)
    return Ran(command, returncode, stdout_log.read_text(), stderr_log.read_text(), replies)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


# -- What each command must print --------------------------------------------------------------------


def assert_clean(ran: Ran) -> None:
    assert ran.returncode == 0, ran.output
    for line in NEVER:
        assert line not in ran.stdout + ran.stderr, f"{line!r} in the output:\n{ran.output}"


def console_trees(ran: Ran) -> Trees:
    assert_clean(ran)
    return Trees(console_spans(ran.stdout), ran.output)


# otel_bgtasks' hints for POST /order (wrappers.py), printed on stderr next to the spans.
ORDER_HINTS = (
    "Background task otel_bgtasks.cli.demo_app.charge_card failed (error): "
    "otel_bgtasks.cli.demo_app.PaymentDeclinedError",
    "Skipped 1 background task(s) because an earlier task in the same BackgroundTasks failed: "
    "otel_bgtasks.cli.demo_app.send_receipt.",
)


def assert_order_hints(ran: Ran) -> None:
    """Each hint once, on stderr: printed, and not twice (lastResort and ours)."""
    for hint in ORDER_HINTS:
        assert ran.stderr.count(hint) == 1, f"{hint!r} not printed once:\n{ran.output}"


def check_fastapi_example(ran: Ran, received: Received) -> None:
    trees = console_trees(ran)
    request = trees.request("/order")
    charge, receipt = trees.task("charge_card"), trees.task("send_receipt")
    assert trees.under(charge, request) and trees.under(receipt, request), ran.output
    assert charge.status == "ERROR"
    assert charge.attributes["error.type"] == "otel_bgtasks.cli.demo_app.PaymentDeclinedError"
    assert receipt.attributes["background_task.outcome"] == "skipped"
    assert ran.replies == ['{"status":"order received"}']
    assert_order_hints(ran)


def check_zero_code_example(ran: Ran, received: Received) -> None:
    check_fastapi_example(ran, received)  # the same routes, traced with no otel_bgtasks line in the app
    trees = console_trees(ran)
    request = trees.request("/order")
    assert request.attributes.get("http.route") == "/order", request  # opentelemetry-instrumentation-fastapi's
    # The lifespan's set-up queries are one trace under one span, not a trace each.
    setup = [span for span in trees.spans if span.name == "demo database set-up"]
    assert len(setup) == 1 and setup[0].parent_id is None, trees.names()
    orphans = [s.name for s in trees.spans if s.kind == "CLIENT" and s.parent_id is None]
    assert not orphans, orphans
    queries = [s for s in trees.spans if s.trace_id == setup[0].trace_id and s is not setup[0]]
    assert queries and all(trees.under(s, setup[0]) for s in queries), trees.names()


def check_starlette_example(ran: Ran, received: Received) -> None:
    trees = console_trees(ran)
    request = trees.request("/many")
    tasks = [trees.task(name) for name in ("warm_cache", "notify_webhook", "write_access_log")]
    assert all(trees.under(task, request) for task in tasks), ran.output
    assert [task.attributes["background_task.outcome"] for task in tasks] == ["success", "error", "skipped"]
    assert tasks[1].attributes["error.type"] == "ConnectionError"
    assert ran.replies == ['{"status":"ok"}']


def check_database_example(ran: Ran, received: Received) -> None:
    trees = console_trees(ran)
    request = trees.request("/audit-wrong")
    task = trees.task("record_signup_in")
    assert trees.under(task, request), ran.output
    assert task.attributes["error.type"] == "sqlalchemy.exc.InvalidRequestError"
    # SQLAlchemy's instrumentation is on: the route's INSERT is a span in the request's trace.
    statements = [
        value
        for span in trees.spans
        if span.kind == "CLIENT" and trees.under(span, request)
        for value in span.attributes.values()
        if str(value).startswith("INSERT INTO users")
    ]
    assert statements, ran.output


def check_link_mode(ran: Ran, received: Received) -> None:
    assert_clean(ran)
    trees = Trees(received.spans(), ran.output)
    request = trees.request("address=link")
    task = [s for s in trees.spans if s.name == "BackgroundTask send_welcome_email" and request.span_id in s.links]
    assert len(task) == 1, trees.names()
    assert task[0].parent_id is None and task[0].trace_id != request.trace_id
    assert "welcome mail to link" in ran.stdout


def check_disabled(ran: Ran, received: Received) -> None:
    assert_clean(ran)
    trees = Trees(received.spans(), ran.output)
    request = trees.request("address=off")
    # No span of ours (they all have an outcome). opentelemetry-instrumentation-fastapi's bare task span,
    # with no attributes, is still there: the README's "off" is otel_bgtasks's.
    ours = [s for s in trees.spans if "background_task.outcome" in s.attributes]
    assert not [s for s in ours if s.trace_id == request.trace_id or request.span_id in s.links], trees.names()
    assert "welcome mail to off" in ran.stdout  # the task ran


def check_demo(ran: Ran, received: Received) -> None:
    assert_clean(ran)
    for expected in ("POST /order → 200", "BackgroundTask charge_card", "✘ error", "⏭ skipped", "record_signup_in"):
        assert expected in ran.stdout, ran.output


def check_watch(ran: Ran, received: Received) -> None:
    assert_clean(ran)
    for expected in (
        "POST /order → 200",
        "BackgroundTask charge_card  ✘ error",
        "BackgroundTask send_receipt  ⏭ skipped",
    ):
        assert expected in ran.stdout, ran.output
    assert_order_hints(ran)  # the watched app's stderr, passed through
    assert "Stopping reloader process" in ran.stderr, ran.output  # stopped by the one SIGINT, as by Ctrl+C


def check_pytest_plugin(ran: Ran, received: Received) -> None:
    assert ran.returncode == 0, ran.output
    assert "otel_bgtasks: strict background tasks" in ran.stdout, ran.output  # the header: strict mode is on
    assert re.search(r"^=+ 1 passed", ran.stdout, re.MULTILINE), ran.output


def check_promtool(ran: Ran, received: Received) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus package)")
    assert ran.returncode == 0, ran.output
    assert "SUCCESS" in ran.output, ran.output


Check = Callable[[Ran, Received], None]

# Server commands, by their text as shown: the request to send when the docs show no curl line, and the check.
_CONSOLE = "opentelemetry-instrument --traces_exporter console --metrics_exporter none --logs_exporter none uvicorn"
SERVERS: dict[str, tuple[str | None, Check]] = {
    f"{_CONSOLE} examples.fastapi_app:app": (None, check_fastapi_example),
    f"{_CONSOLE} examples.zero_code_app:app": ("curl -X POST localhost:8000/order", check_zero_code_example),
    f"{_CONSOLE} examples.starlette_app:app": (None, check_starlette_example),
    f"{_CONSOLE} examples.database:app": (None, check_database_example),
    "OTEL_PYTHON_BGTASKS_MODE=link opentelemetry-instrument uvicorn myapp:app   # options from the environment": (
        "curl -X POST 'localhost:8000/signup?address=link'",
        check_link_mode,
    ),
    "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=background_tasks opentelemetry-instrument uvicorn myapp:app  # off": (
        "curl -X POST 'localhost:8000/signup?address=off'",
        check_disabled,
    ),
    "otel-bgtasks watch -- uvicorn examples.zero_code_app:app --reload": (
        "curl -X POST localhost:8000/order",
        check_watch,
    ),
}
# Commands that run and end (the part after a set-up command's installs).
ONE_SHOTS: dict[str, Check] = {
    "otel-bgtasks demo": check_demo,
    "python -m pytest --bgtasks-strict": check_pytest_plugin,  # the README's test_myapp.py, next to myapp.py
    "promtool check rules collector-config/background-tasks.rules.yml": check_promtool,
    "promtool test rules collector-config/background-tasks.rules.test.yml": check_promtool,
}
# Commands (or the part after a set-up command's installs) not run here, and why.
_BENCHMARK = "a benchmark: one to four minutes of full CPU, meant for a quiet machine (benchmarks/README.md)"
_COMPOSE = "needs the docker compose stack (no Docker engine here); the same route of the same app runs above"
NOT_RUN: dict[str, str] = {
    "python -m pytest": "the test suite, which this test is part of (.ci/run runs it)",
    "python -m pytest            # the suite (real SDK, real apps, real uvicorn servers on 127.0.0.1)": (
        "the test suite, which this test is part of (.ci/run runs it)"
    ),
    "ruff check . && ruff format --check . && pyright   # lint and strict typing (in CI too)": (
        "lint and type checks, not behaviour: .ci/run runs them right after the suite"
    ),
    "python benchmarks/bench_overhead.py   # per task, in bare SDK spans": _BENCHMARK,
    "python benchmarks/bench_load.py       # real uvicorn server + load generator in another process": _BENCHMARK,
    "python benchmarks/bench_memory.py     # RSS and tracemalloc over 100,000 tasks": _BENCHMARK,
    "curl -X POST localhost:8000/order     # a task fails, the task after it is skipped": _COMPOSE,
    "curl -X POST localhost:8000/signup    # two tasks that succeed": _COMPOSE,
    "SENTRY_DSN=https://<key>@<org>.ingest.sentry.io/<project> "
    "OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 uvicorn examples.sentry_and_otel:app": (
        "placeholders for the reader's Sentry DSN, and Sentry's servers are not reachable from here "
        "(tests/test_sentry.py runs the forwarding against a Sentry endpoint on 127.0.0.1)"
    ),
}


# The no-Docker stack (README, "See it"): run by test_no_docker_stack_runs_as_shown, where stack/build-stack.sh
# has built the programs (as .ci/run does; tests/test_real_stack.py runs them in depth).
NO_DOCKER_BUILD = "stack/build-stack.sh   # once: a few minutes cold, then it only prints where the binaries are"
NO_DOCKER_RUN = (
    "stack/run-stack.sh     # Collector, Jaeger and Prometheus on 127.0.0.1 with collector-config/'s files; "
    "Ctrl-C stops them"
)
NO_DOCKER_APP = (
    "OTEL_SERVICE_NAME=otel-bgtasks-example OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 "
    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_LOGS_EXPORTER=none OTEL_METRIC_EXPORT_INTERVAL=10000 "
    "opentelemetry-instrument uvicorn examples.fastapi_app:app"
)
NO_DOCKER = (NO_DOCKER_BUILD, NO_DOCKER_RUN, NO_DOCKER_APP)


def runnable(shown: Shown) -> str:
    """The part of the command this test runs or lists ('' for a command that is all set-up)."""
    setup, rest = split_setup(shown.command)
    for step in setup:
        if step.startswith("pip install"):
            assert_installed(step)
    return rest


@dataclass
class Results:
    ran: dict[str, Ran | Exception]
    received: Received


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Every runnable command, run side by side; each test then checks one."""
    myapp_dir = tmp_path_factory.mktemp("myapp")
    (myapp_dir / "myapp.py").write_text(MYAPP)
    (myapp_dir / "test_myapp.py").write_text(readme_test_file())
    logs = tmp_path_factory.mktemp("logs")
    jobs: dict[str, Callable[[], Ran]] = {}
    for shown in shown_commands().values():
        part = runnable(shown)
        if part in ONE_SHOTS:
            # The README's commands run from the repository root; the demo runs anywhere (and so from elsewhere).
            cwd = REPO if "collector-config/" in part else myapp_dir
            jobs[part] = lambda part=part, cwd=cwd: run_once(part, cwd)
        elif part in SERVERS:
            default_request, _ = SERVERS[part]
            requests = shown.curls or ([default_request] if default_request else [])
            cwd = myapp_dir if "myapp:app" in part else REPO
            jobs[part] = lambda part=part, requests=requests, cwd=cwd: run_server(part, cwd, requests, logs)
    with otlp_grpc_receiver() as received, futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        pending = {command: pool.submit(job) for command, job in jobs.items()}
        ran: dict[str, Ran | Exception] = {}
        for command, future in pending.items():
            try:
                ran[command] = future.result()
            except Exception as exc:  # raised again by the command's own test
                ran[command] = exc
        return Results(ran, received)


def test_every_command_is_run_or_listed() -> None:
    shown = shown_commands()
    parts = {runnable(entry) for entry in shown.values()}
    unknown = [
        f"{part!r} ({', '.join(entry.where)})"
        for entry in shown.values()
        if (part := runnable(entry)) and not any(part in known for known in (SERVERS, ONE_SHOTS, NOT_RUN, NO_DOCKER))
    ]
    assert not unknown, "shown in the docs, neither run by this test nor listed in NOT_RUN:\n" + "\n".join(unknown)
    stale = [command for command in (*SERVERS, *ONE_SHOTS, *NOT_RUN, *NO_DOCKER) if command not in parts]
    assert not stale, f"no longer shown in the docs: {stale}"
    # Every curl line either has its server run here, or belongs to a server listed as not run.
    assert all(
        runnable(entry) in SERVERS or runnable(entry) in NOT_RUN or runnable(entry) == NO_DOCKER_APP
        for entry in shown.values()
        if entry.curls
    )


def test_readme_shows_the_zero_code_install() -> None:
    shown = shown_commands().values()
    installs = [entry.command.split("#")[0].strip() for entry in shown if "README.md" in entry.where]
    assert "pip install 'otel_bgtasks[zero-code]'" in installs
    assert "pip install -e '.[zero-code]'" in installs
    assert {r.name for r in requirements_of({"zero-code"})} >= {
        "opentelemetry-distro",
        "opentelemetry-instrumentation-starlette",
    }


def test_zero_code_extra_leads_the_resolver() -> None:
    """pip (25.1 on) resolves upper-bounded requirements first, which -starlette alone of the contrib packages has.

    Each contrib package pins its own release of opentelemetry-instrumentation, and -starlette often lags a
    patch release behind the others: resolved first, it fixes the release for them, and pip goes straight to a
    consistent set (without, it tried 31 older -starlette releases first).
    """
    requirements = requirements_of({"demo"})
    upper_bounded = {
        r.name
        for r in requirements
        if r.name.startswith("opentelemetry-") and any(s.operator in ("<", "<=", "~=") for s in r.specifier)
    }
    assert upper_bounded == {"opentelemetry-instrumentation-starlette"}
    assert "needs pip 25.1 or newer" in (REPO / "README.md").read_text()


_RELEASED = re.compile(r"^pip install '(otel_bgtasks\[[a-z,-]+\])'\s+# (.+)$")
_CLONE = re.compile(r"^pip install -e '\.(\[[a-z,-]+\])'\s+# (.+)$")


def test_every_install_line_has_both_forms_labelled() -> None:
    """Until the package is on PyPI, its released form fails in a fresh environment: the clone's is next to it."""
    for where, lines in shell_blocks():
        released = {m.group(1).removeprefix("otel_bgtasks"): m.group(2) for m in map(_RELEASED.match, lines) if m}
        clone = {m.group(1): m.group(2) for m in map(_CLONE.match, lines) if m}
        bare = [line for line in lines if "pip install 'otel_bgtasks[" in line and not _RELEASED.match(line)]
        assert not bare, f"{where}: an install line without its label: {bare}"
        # (Development's dev extra is for a clone only.)
        assert released.keys() <= clone.keys(), f"{where}: released {sorted(released)}, from a clone {sorted(clone)}"
        for label in released.values():
            assert "released package" in label, f"{where}: {label!r}"
        for label in clone.values():
            assert "from a clone" in label, f"{where}: {label!r}"


def test_zero_code_example_never_instruments() -> None:
    """README's zero-code command shows the entry point at work: the app itself calls no instrument()."""
    tree = ast.parse((REPO / "examples" / "zero_code_app.py").read_text())
    called = [
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    ]
    assert not [name for name in called if "instrument" in name.lower()], called
    assert f"{_CONSOLE} examples.zero_code_app:app" in shown_commands()


def _test_id(command: str) -> str:
    """The app and the variables set: enough to tell the commands apart."""
    return " ".join(word for word in command.split() if "=" in word or word.endswith(":app")) or command


@pytest.mark.parametrize("command", [*SERVERS, *ONE_SHOTS], ids=_test_id)
def test_command_runs_as_shown(results: Results, command: str) -> None:
    outcome = results.ran.get(command)
    assert outcome is not None, f"not shown in the docs: {command}"
    if isinstance(outcome, Exception):
        raise outcome
    check = SERVERS[command][1] if command in SERVERS else ONE_SHOTS[command]
    check(outcome, results.received)


# The variables stack/run-stack.sh takes a port from, each given a free one here.
STACK_PORTS = re.findall(r"\$\{(STACK_\w+_PORT):-", (REPO / "stack" / "run-stack.sh").read_text())


@pytest.mark.real_stack
def test_no_docker_stack_runs_as_shown(tmp_path: Path) -> None:
    directory = stack_bin()
    if not all((directory / name).is_file() for name in ("otelcol", "jaeger", "prometheus")):
        reason = f"the stack's programs are not built in {directory} (stack/build-stack.sh)"
        if os.environ.get("STACK_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    shown = shown_commands()
    built = run_once(runnable(shown[NO_DOCKER_BUILD]), REPO)  # built already: it prints where
    assert built.returncode == 0 and built.stdout == f"{directory}\n", built.output

    assert len(STACK_PORTS) == 11, STACK_PORTS
    ports = {variable: free_port() for variable in STACK_PORTS}
    log = tmp_path / "stack.out"
    with log.open("wb") as output:
        stack = subprocess.Popen(
            ["bash", "-c", NO_DOCKER_RUN],
            cwd=REPO,
            env={**environment(), **{variable: str(port) for variable, port in ports.items()}},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # SIGINT to its process group, as Ctrl+C in a terminal
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while "ready:" not in log.read_text():
            assert stack.poll() is None, f"exited with {stack.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready after {START_SECONDS}s:\n{log.read_text()}"
            time.sleep(0.1)
        prometheus = f"localhost:{ports['STACK_PROMETHEUS_PORT']}"
        rules = json.loads(subprocess.run(["curl", "-s", f"{prometheus}/api/v1/rules"], capture_output=True).stdout)
        assert [(g["name"], len(g["rules"])) for g in rules["data"]["groups"]] == [("otel_bgtasks", 12)]

        # The app as shown, sending to this run's Collector; its curl lines as shown, to this run's ports.
        app = NO_DOCKER_APP.replace("localhost:4318", f"localhost:{ports['STACK_OTLP_HTTP_PORT']}")
        order, query = shown[NO_DOCKER_APP].curls
        ran = run_server(app, REPO, [order], tmp_path)
        assert_clean(ran)
        assert ran.replies == ['{"status":"order received"}']
        query = query.replace("localhost:16686", f"localhost:{ports['STACK_JAEGER_UI_PORT']}")
        deadline = time.monotonic() + START_SECONDS
        while True:  # the app's last spans left at its exit: Jaeger has them within a few seconds
            reply = subprocess.run(["bash", "-c", query], capture_output=True, text=True, check=False)
            traces = json.loads(reply.stdout)["data"] if reply.returncode == 0 and reply.stdout else None
            spans = {span["operationName"]: span for trace in traces or [] for span in trace["spans"]}
            if {"BackgroundTask charge_card", "BackgroundTask send_receipt"} <= set(spans):
                break
            assert time.monotonic() < deadline, f"{query}: {reply.stdout}{reply.stderr}\n{log.read_text()}"
            time.sleep(0.5)
        assert len(traces or []) == 1
        tags = {name: {tag["key"]: tag["value"] for tag in span["tags"]} for name, span in spans.items()}
        assert tags["BackgroundTask charge_card"]["background_task.outcome"] == "error"
        assert tags["BackgroundTask charge_card"]["otel.status_code"] == "ERROR"
        assert tags["BackgroundTask send_receipt"]["background_task.outcome"] == "skipped"
        charge = spans["BackgroundTask charge_card"]
        logs = [{f["key"]: f["value"] for f in entry["fields"]} for entry in charge["logs"]]
        assert [entry["exception.type"] for entry in logs] == ["otel_bgtasks.cli.demo_app.PaymentDeclinedError"]
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait(STOP_SECONDS)
    assert stack.returncode == 0, log.read_text()  # Ctrl+C stops all three: a normal end
