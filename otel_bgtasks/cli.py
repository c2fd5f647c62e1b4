"""``otel-bgtasks demo``: serve a demo app, call each route once and print every request's trace as a tree.

Run it (needs the ``demo`` extra, ``pip install 'otel_bgtasks[demo]'``)::

    otel-bgtasks demo                 # or: otel-bgtasks, or: python -m otel_bgtasks.cli demo
    otel-bgtasks demo --otlp-endpoint http://localhost:4318   # send the spans to a collector instead

The app is :mod:`otel_bgtasks.demo_app`, served by a real uvicorn server on a free local port, so
that background tasks run exactly as in production: after the response, in the server's event loop.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from otel_bgtasks import semconv

# The demo's dependencies come with the ``demo`` extra, not with otel_bgtasks: they are imported where
# used, so that the console script can say what is missing instead of failing at import.
if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree
    from starlette.types import ASGIApp

    from otel_bgtasks.demo_app import DemoRequest

_DEMO_EXTRA = (
    "fastapi",
    "uvicorn",
    "httpx",
    "rich",
    "sqlalchemy",
    "aiosqlite",
    "opentelemetry.sdk",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.instrumentation.sqlalchemy",
)
SERVICE = "otel-bgtasks-demo"
_TASK_PREFIX = semconv.SPAN_NAME_PREFIX + " "
# Spans that say nothing about background tasks: the ASGI middleware's per-message spans, and
# FastAPI's dependency and serialization steps (hidden only when nothing hangs under them).
_HIDDEN_SUFFIXES = (" http send", " http receive")
_HIDDEN_LEAVES = frozenset({"fastapi.dependencies", "fastapi.serialization"})
_OUTCOME_STYLES = {
    semconv.OUTCOME_SUCCESS: ("✔", "green"),
    semconv.OUTCOME_ERROR: ("✘", "bold red"),
    semconv.OUTCOME_TIMEOUT: ("✘", "bold red"),
    semconv.OUTCOME_SKIPPED: ("⏭", "yellow"),
    semconv.OUTCOME_CANCELLED: ("⊘", "yellow"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otel-bgtasks`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="otel-bgtasks", description="Tools for otel_bgtasks.")
    parser.set_defaults(command="demo", otlp_endpoint=None)
    commands = parser.add_subparsers(title="commands", dest="command")
    demo = commands.add_parser(
        "demo",
        help="serve a demo app, call each route and show the background-task spans (the default command)",
        description="Serve otel_bgtasks.demo_app on 127.0.0.1, call each route once, and print each "
        "request's trace as a tree: which tasks ran, failed or were skipped, and why.",
    )
    demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send the spans over OTLP/HTTP to this collector (e.g. http://localhost:4318) instead of printing them",
    )
    args = parser.parse_args(argv)
    missing = _missing(_DEMO_EXTRA)
    if missing:
        print(
            f"otel-bgtasks demo needs the demo extra: pip install 'otel_bgtasks[demo]' (missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    return run_demo(otlp_endpoint=args.otlp_endpoint)


def _missing(modules: Sequence[str]) -> list[str]:
    missing: list[str] = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def run_demo(otlp_endpoint: str | None = None, console: Console | None = None) -> int:
    """Run the demo against the global tracer provider, setting an SDK one first if there is none."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from rich.console import Console

    from otel_bgtasks import demo_app

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 120  # piped or captured: rich's fallback of 80 columns wraps most task lines
    provider = _sdk_provider()
    if provider is None:
        console.print("[red]The global tracer provider is not the OpenTelemetry SDK's: the demo cannot read its spans.")
        return 1
    # Always keep the spans in memory: the demo waits on them, and prints them unless they go to OTLP.
    memory = InMemorySpanExporter()
    processors: list[SpanProcessor] = [SimpleSpanProcessor(memory)]
    delivery: _Delivery | None = None
    if otlp_endpoint is None:
        console.print(
            "[bold]otel-bgtasks demo[/], one tree per request · tasks: [green]✔ success[/] [red]✘ error[/] "
            "[yellow]⏭ skipped[/] · run time · queued · async|threadpool"
        )
    else:
        delivery = _Delivery(otlp_endpoint)
        processors.append(delivery.processor())
        console.print(f"otel-bgtasks demo: sending the spans to {delivery.endpoint} ...")
    for processor in processors:
        provider.add_span_processor(processor)

    app = demo_app.create_app()
    # A full garbage collection of what the imports left takes ~80 ms: landing inside a request, it makes
    # that request look slow at random. Collect now and exempt the survivors from later collections.
    gc.collect()
    gc.freeze()
    try:
        with _capture_logs() as logs:
            statuses = _serve_and_call(app, demo_app.REQUESTS, memory)
    finally:
        gc.unfreeze()
    for processor in processors:
        processor.force_flush()
        processor.shutdown()

    traces = _request_traces(memory.get_finished_spans())
    if delivery is not None:
        return delivery.report(console, len(memory.get_finished_spans()), len(traces))
    missing = 0
    for request, status in zip(demo_app.REQUESTS, statuses, strict=True):
        console.print()
        spans = traces.get(request.path)
        if spans is None:
            missing += 1
            console.print(f"[bold]{request.method} {request.path}[/] → {status}  [red]no trace recorded")
            continue
        console.print(_tree(spans, status, request.shows))
    if logs.records or logs.asgi_tracebacks:
        console.print()
        console.print(logs.tree())
    return 1 if missing else 0


# -- Tracer provider and exporters ----------------------------------------------------------------


def _sdk_provider() -> TracerProvider | None:
    """The global SDK provider: the one already set (say by ``opentelemetry-instrument``), or a new one."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
        trace.set_tracer_provider(provider)
        return provider
    return current if isinstance(current, TracerProvider) else None


class _Delivery:
    """Spans sent over OTLP/HTTP, and how many got through, which the batch processor won't say."""

    def __init__(self, endpoint: str) -> None:
        # Accept the collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT does) or its /v1/traces URL.
        endpoint = endpoint.rstrip("/")
        self.endpoint = endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"
        self.sent = 0

    def processor(self) -> SpanProcessor:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

        delivery = self

        class CountingExporter(OTLPSpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                result = super().export(spans)
                if result is SpanExportResult.SUCCESS:
                    delivery.sent += len(spans)
                return result

        return BatchSpanProcessor(CountingExporter(endpoint=self.endpoint, timeout=5))

    def report(self, console: Console, recorded: int, traces: int) -> int:
        """Say where the spans went; the exit status."""
        if self.sent < recorded:
            console.print(
                f"[red]Could not send every span to {self.endpoint}: {self.sent} of {recorded} sent "
                "(the exporter's log says why)."
            )
            return 1
        console.print(f"Sent {self.sent} spans ({traces} request traces, service.name={SERVICE}) to {self.endpoint}.")
        return 0


# -- Serving the app and calling it ---------------------------------------------------------------


class _LogCapture(logging.Handler):
    """Holds uvicorn's and otel_bgtasks' log records until the trees are printed, and drops their tracebacks.

    Each failed task is otherwise logged twice with its full traceback: by otel_bgtasks ("Background
    task ... failed") and by uvicorn ("Exception in ASGI application"). The trees already say what
    failed and why.
    """

    LOGGERS = ("uvicorn.error", "otel_bgtasks")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.asgi_tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "uvicorn.error" and record.exc_info:
            self.asgi_tracebacks += 1
        else:
            self.records.append(record)

    def tree(self) -> Tree:
        """One line per record, tracebacks left out."""
        from rich.text import Text
        from rich.tree import Tree

        label = Text.assemble(("Logged meanwhile", "bold"), ", tracebacks left out")
        if self.asgi_tracebacks:
            label.append(f" (and uvicorn's {self.asgi_tracebacks} 'Exception in ASGI application': the ✘ tasks)")
        tree = Tree(label)
        for record in self.records:
            tree.add(Text(f"{record.levelname} {record.name}: {record.getMessage()}", style="dim"))
        return tree


@contextmanager
def _capture_logs() -> Generator[_LogCapture]:
    capture = _LogCapture()
    loggers = [logging.getLogger(name) for name in _LogCapture.LOGGERS]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.propagate = False
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield capture
    finally:
        for logger, (propagate, level) in zip(loggers, saved, strict=True):
            logger.removeHandler(capture)
            logger.propagate = propagate
            logger.setLevel(level)


def _serve_and_call(app: ASGIApp, requests: Sequence[DemoRequest], memory: InMemorySpanExporter) -> list[str]:
    """Serve ``app`` with uvicorn in a thread, send each request, and stop the server; return the statuses.

    Each request waits for its tasks' spans before the next is sent, so that tasks of different
    requests don't overlap and every run prints the same trees. Stopping the server waits for tasks
    still running.
    """
    import httpx
    import uvicorn

    # log_config=None: leave the process's logging alone (uvicorn's default config installs its own handlers).
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="otel-bgtasks-demo-server", daemon=True)
    thread.start()
    statuses: list[str] = []
    try:
        _wait(lambda: server.started or not thread.is_alive(), timeout=10)
        if not server.started:
            raise RuntimeError("the demo server did not start")
        port: int = server.servers[0].sockets[0].getsockname()[1]
        # No keep-alive: after a task fails, uvicorn closes the connection the request came on.
        limits = httpx.Limits(max_keepalive_connections=0)
        expected_tasks = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10) as client:
            for request in requests:
                try:
                    statuses.append(str(client.request(request.method, request.path).status_code))
                except httpx.HTTPError as exc:
                    statuses.append(f"{type(exc).__name__}: {exc}")
                expected_tasks += request.tasks
                _wait_for_tasks(memory, expected_tasks, timeout=5)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    return statuses


def _wait_for_tasks(memory: InMemorySpanExporter, count: int, timeout: float) -> None:
    """Wait until ``count`` task spans have ended: every task queued so far ran, failed or was skipped."""
    _wait(lambda: sum(span.name.startswith(_TASK_PREFIX) for span in memory.get_finished_spans()) >= count, timeout)


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    """Poll: the server's thread gives no signal to wait on."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


# -- Traces to trees ------------------------------------------------------------------------------


def _request_traces(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    """The spans of each trace that starts at a request (a server span), by the request's path.

    Other traces (the tables created at startup) are left out. In ``mode="link"`` a task starts a
    trace of its own, linked to the span that queued it: it is folded into that request's trace.
    """
    by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_trace[_trace_id(span)].append(span)
    trace_of = {_span_id(span): _trace_id(span) for span in spans}
    by_path: dict[str, list[ReadableSpan]] = {}
    for trace_spans in by_trace.values():
        root = _roots(trace_spans)[0]
        path = (root.attributes or {}).get("url.path", (root.attributes or {}).get("http.target"))
        if root.kind is SpanKind.SERVER and isinstance(path, str):
            by_path[path] = trace_spans
    for trace_spans in by_trace.values():
        root = _roots(trace_spans)[0]
        linked = [link.context.span_id for link in root.links if link.context.span_id in trace_of]
        if root.kind is not SpanKind.SERVER and linked:
            by_trace[trace_of[linked[0]]].extend(trace_spans)
    return by_path


def _span_id(span: ReadableSpan) -> int:
    return span.context.span_id if span.context is not None else 0


def _trace_id(span: ReadableSpan) -> int:
    return span.context.trace_id if span.context is not None else 0


def _roots(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """Spans whose parent is not among ``spans``, earliest first."""
    ids = {_span_id(span) for span in spans}
    roots = [span for span in spans if span.parent is None or span.parent.span_id not in ids]
    return sorted(roots, key=lambda span: span.start_time or 0)


def _parent_id(span: ReadableSpan, ids: set[int]) -> int | None:
    """The span's parent in the tree: its real parent, or for a linked trace's root, the span it links to."""
    if span.parent is not None and span.parent.span_id in ids:
        return span.parent.span_id
    for link in span.links:
        if link.context.span_id in ids:
            return link.context.span_id
    return None


def _tree(spans: Sequence[ReadableSpan], status: str, shows: str) -> Tree:
    """One request's trace as a tree, its server span at the root."""
    from rich.text import Text
    from rich.tree import Tree

    ids = {_span_id(span) for span in spans}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in sorted(spans, key=lambda span: span.start_time or 0):
        children[_parent_id(span, ids)].append(span)
    root = children[None][0]
    label = Text.assemble((root.name, "bold cyan"), f" → {status}  {_ms(root.start_time, root.end_time)}")
    trace_end = max(span.end_time or 0 for span in spans)
    if trace_end > (root.end_time or 0):
        label.append(f"  (its tasks ran until +{_ms(root.start_time, trace_end)})", style="dim")
    label.append(f"\n{shows}", style="italic")
    tree = Tree(label)

    def add(parent: Tree, span: ReadableSpan) -> None:
        kids = children[_span_id(span)]
        if span.name.endswith(_HIDDEN_SUFFIXES) or (span.name in _HIDDEN_LEAVES and not kids):
            return
        node = parent.add(_label(span))
        if span.status.status_code is StatusCode.ERROR:
            error = str((span.attributes or {}).get(semconv.ERROR_TYPE, "error"))
            description = span.status.description
            node.add(Text(f"{error}: {description}" if description else error, style="red"))
        for warning in _warnings(span):
            node.add(Text(f"⚠ {warning}", style="yellow"))
        for kid in kids:
            add(node, kid)

    for span in children[_span_id(root)]:
        add(tree, span)
    return tree


def _warnings(span: ReadableSpan) -> list[str]:
    """What otel_bgtasks' events on ``span`` warn about: a task that blocked the loop, an invalid task."""
    warnings: list[str] = []
    for event in span.events:
        attributes = event.attributes or {}
        if event.name == semconv.EVENT_LOOP_BLOCKED:
            held = attributes.get(semconv.BLOCKING_MAX)
            seconds = f" for {held * 1e3:.0f} ms" if isinstance(held, float) else ""
            warnings.append(f"blocked the event loop{seconds} without awaiting: nothing else on the loop ran meanwhile")
        elif event.name == semconv.EVENT_INVALID:
            warnings.append(f"invalid task: {attributes.get(semconv.PROBLEM)}")
    return warnings


def _ms(start: int | None, end: int | None) -> str:
    return f"{((end or 0) - (start or 0)) / 1e6:.1f} ms"


def _label(span: ReadableSpan) -> Text:
    from rich.text import Text

    attributes = span.attributes or {}
    if not span.name.startswith(_TASK_PREFIX):
        label = Text.assemble(span.name, (f"  {_ms(span.start_time, span.end_time)}", "dim"))
        statement = attributes.get("db.statement")
        if isinstance(statement, str):
            label.append(f"  {' '.join(statement.split())[:70]}", style="dim")
        return label
    outcome = str(attributes.get(semconv.OUTCOME, "unknown"))
    symbol, style = _OUTCOME_STYLES.get(outcome, ("?", "magenta"))
    link = "↪ linked trace: " if span.parent is None and span.links else ""
    label = Text.assemble((f"{link}{span.name}", "bold"), "  ", (f"{symbol} {outcome}", style))
    if outcome == semconv.OUTCOME_SKIPPED:
        label.append("  never ran: an earlier task failed", style="yellow dim")
        return label
    label.append(f"  {_ms(span.start_time, span.end_time)}")
    queued = attributes.get(semconv.QUEUE_DURATION)
    if isinstance(queued, float):
        label.append(f"  queued {queued * 1e3:.1f} ms", style="dim")
    label.append(f"  {attributes.get(semconv.EXECUTION, '?')}", style="dim")
    return label


if __name__ == "__main__":
    raise SystemExit(main())
