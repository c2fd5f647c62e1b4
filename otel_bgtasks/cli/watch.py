"""``otel-bgtasks watch -- <command>``: run your own app and print each request's trace as a tree.

The command runs with the OpenTelemetry SDK set up by the same mechanism as ``opentelemetry-instrument``:
its ``sitecustomize`` (run by ours, first on ``PYTHONPATH``) configures the SDK from ``OTEL_*`` variables
and loads every installed instrumentation (otel_bgtasks' among them), in every Python process the
command starts, uvicorn's ``--reload`` worker included. So the app needs no change. Its spans come back
over OTLP/HTTP to a receiver on 127.0.0.1; each request's tree is printed when its tasks have ended
(see ``PAUSE_SECONDS``), between the lines the command itself prints, which pass through untouched.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

from otel_bgtasks import semconv
from otel_bgtasks.cli import INSTALL_DEMO_EXTRA, demo_extra
from otel_bgtasks.cli.receiver import SpanReceiver
from otel_bgtasks.cli.trees import (
    LEGEND,
    group_traces,
    is_task,
    request_span,
    trace_id_of,
    trace_tree,
    tree_console,
)

with demo_extra():
    from opentelemetry.sdk.trace import ReadableSpan
    from rich.console import Console

# The watched app's batch span processor exports every 100 ms instead of every 5 s: trees come promptly.
EXPORT_DELAY_MS = 100
# In the default child mode nothing says how many tasks a request queued (each task span's parent says
# which request queued it): a request's tree is printed once no span of it has come for this long, and
# again if a task ends later.
PAUSE_SECONDS = 1.0
# In mode="link" the request's background_task.enqueued events count its tasks: its tree is printed
# once that many task spans have come and then nothing for this long, or, if some are still running,
# after QUIET_SECONDS without news, saying so.
SETTLE_SECONDS = 0.3
QUIET_SECONDS = 3.0
# A printed trace's spans are kept this long after its last news, so that a task ending later prints the
# whole tree again.
KEEP_SECONDS = 30.0
# The directory of the sitecustomize the command runs.
_SITECUSTOMIZE = str(Path(__file__).parent / "_watched")


def run_watch(command: Sequence[str], otlp_endpoint: str | None = None, console: Console | None = None) -> int:
    """Run ``command`` traced, print its requests' trees until it exits; its exit status."""
    executable = shutil.which(command[0])
    if executable is None:
        print(f"otel-bgtasks watch: command not found: {command[0]}", file=sys.stderr)
        return 127
    if importlib.util.find_spec("opentelemetry.distro") is None:
        print(
            "otel-bgtasks watch sets up the SDK with opentelemetry-distro, which is missing: " + INSTALL_DEMO_EXTRA,
            file=sys.stderr,
        )
        return 2
    console = console if console is not None else tree_console()
    traces = Traces()
    with SpanReceiver(forward_to=otlp_endpoint) as receiver:
        console.print(f"[bold]otel-bgtasks watch[/] {shlex.join(command)} · one tree per request · {LEGEND}")
        if receiver.forwarder is not None:
            console.print(f"Sending the spans on to {receiver.forwarder.url}")
        # Run by the terminal (Ctrl-C reaches us both): in our process group, so that it can still read
        # the terminal (a breakpoint); otherwise in a group of its own, which gets our signals.
        own_group = not _in_terminal_foreground()
        child = _start([executable, *command[1:]], command_environment(receiver.traces_url), own_group)
        receiver.start()  # after the fork: a thread started before it would make preexec_fn unsafe
        with _forwarding_signals(child, own_group):
            while child.poll() is None:
                traces.add(receiver.get(timeout=0.1), time.monotonic())
                _print(console, traces.ready(time.monotonic()))
        # Its exporter sent its last spans before the command exited: every span has come.
        traces.add(receiver.drain(), time.monotonic())
        _print(console, traces.ready(time.monotonic(), final=True))
    forwarder = receiver.forwarder
    if forwarder is not None:
        failed = f", {forwarder.failed} failed" if forwarder.failed else ""
        console.print(f"Sent {forwarder.sent} export requests on to {forwarder.url}{failed}.")
    code = child.returncode
    return 128 - code if code < 0 else code  # killed by a signal: what a shell reports


def command_environment(traces_url: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: spans to ``traces_url``, and its Python processes set up to send them.

    As ``opentelemetry-instrument`` does: a ``sitecustomize`` first on ``PYTHONPATH`` (ours, which runs
    its own), then the working directory (for apps run by an executable of their own), then what was there.
    """
    environment = dict(os.environ if environ is None else environ)
    path = [entry for entry in environment.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if os.getcwd() not in path:
        path.insert(0, os.getcwd())
    environment["PYTHONPATH"] = os.pathsep.join([_SITECUSTOMIZE, *(entry for entry in path if entry != _SITECUSTOMIZE)])
    environment.update(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces_url,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": str(EXPORT_DELAY_MS),
        }
    )
    # Its prints come when they happen, among the trees, even though its output is not a terminal.
    environment.setdefault("PYTHONUNBUFFERED", "1")
    return environment


def _in_terminal_foreground() -> bool:
    """Whether this process is in the terminal's foreground process group: what Ctrl-C signals."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):  # no terminal, stdin closed, or none at all
        return False


def _start(argv: list[str], environment: dict[str, str], own_group: bool) -> subprocess.Popen[bytes]:
    if not own_group:
        return subprocess.Popen(argv, env=environment)
    if sys.version_info >= (3, 11):
        return subprocess.Popen(argv, env=environment, process_group=0)
    return subprocess.Popen(argv, env=environment, preexec_fn=os.setpgrp)  # safe: no thread runs yet


@contextmanager
def _forwarding_signals(child: subprocess.Popen[bytes], own_group: bool) -> Generator[None]:
    """Pass SIGINT, SIGTERM and SIGHUP on to the command; we stop when it has stopped.

    Exactly once: uvicorn takes a second SIGINT as "force exit", skipping the background tasks still
    running. So in the terminal's process group, where the terminal itself signals the command on
    Ctrl-C or hang-up, only SIGTERM is passed on.
    """

    def forward(signum: int, _frame: FrameType | None) -> None:
        with suppress(ProcessLookupError):  # it has just exited
            if own_group:
                os.killpg(child.pid, signum)  # the whole group: uvicorn's --reload worker too, as a terminal does
            elif signum == signal.SIGTERM:
                os.kill(child.pid, signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _print(console: Console, trees: Iterable[tuple[list[ReadableSpan], str | None]]) -> None:
    for spans, note in trees:
        console.print()
        console.print(trace_tree(spans, note=note))


class Traces:
    """The spans received, by trace, and which traces are ready to print (see ``PAUSE_SECONDS``).

    Traces with neither a request nor a task span (the app's startup, say) are never printed.
    """

    def __init__(self) -> None:
        self._spans: dict[int, list[ReadableSpan]] = {}  # by trace id
        self._last_news: dict[int, float] = {}  # trace id -> when its last span came
        self._pending: set[int] = set()  # traces with spans not printed yet
        self._printed: set[int] = set()

    def add(self, spans: Iterable[ReadableSpan], now: float) -> None:
        """Spans that have just come."""
        for span in spans:
            trace_id = trace_id_of(span)
            self._spans.setdefault(trace_id, []).append(span)
            self._last_news[trace_id] = now
            self._pending.add(trace_id)

    def ready(self, now: float, final: bool = False) -> list[tuple[list[ReadableSpan], str | None]]:
        """The traces to print now, each with a note or ``None``; ``final``: every trace left, and forget all."""
        ready: list[tuple[list[ReadableSpan], str | None]] = []
        if not self._pending:  # nothing to print: only forget what has been quiet long enough
            self._forget([trace_id for trace_id, last in self._last_news.items() if now - last >= KEEP_SECONDS])
            return ready
        for spans in group_traces(span for trace_spans in self._spans.values() for span in trace_spans):
            trace_ids = {trace_id_of(span) for span in spans}
            quiet = now - max(self._last_news[trace_id] for trace_id in trace_ids)
            if not trace_ids & self._pending:
                if quiet >= KEEP_SECONDS:
                    self._forget(trace_ids)
                continue
            tasks = sum(is_task(span) for span in spans)
            if request_span(spans) is None and not tasks:
                if final or quiet >= QUIET_SECONDS:
                    self._forget(trace_ids)
                continue
            queued = sum(event.name == semconv.EVENT_ENQUEUED for span in spans for event in span.events)
            if queued:  # mode="link": the request counted its tasks
                due = quiet >= QUIET_SECONDS or (tasks >= queued and quiet >= SETTLE_SECONDS)
            else:
                due = quiet >= PAUSE_SECONDS
            if final or due:
                ready.append((spans, _note(tasks, queued, bool(trace_ids & self._printed), final)))
                self._pending -= trace_ids
                self._printed |= trace_ids
        if final:
            self._forget(list(self._spans))
        return ready

    def _forget(self, trace_ids: Iterable[int]) -> None:
        for trace_id in trace_ids:
            self._spans.pop(trace_id, None)
            self._last_news.pop(trace_id, None)
            self._pending.discard(trace_id)
            self._printed.discard(trace_id)


def _note(tasks: int, queued: int, printed_before: bool, final: bool) -> str | None:
    if tasks < queued:
        when = "when the command exited" if final else "yet"
        return f"{queued - tasks} of its {queued} queued tasks had not ended {when} (still running, or never run)"
    if printed_before:
        return "again, with what has ended since"
    return None
