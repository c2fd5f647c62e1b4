"""``otel-bgtasks demo``: serve a demo app, call each route once and print every request's trace as a tree.

The app is :mod:`otel_bgtasks.cli.demo_app`, served by a real uvicorn server on a free local port, so
that background tasks run exactly as in production: after the response, in the server's event loop.
Needs the ``demo`` extra (``pip install 'otel_bgtasks[demo]'``, or ``pip install -e '.[demo]'`` from a clone);
see :mod:`otel_bgtasks.cli` for the command.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager

from opentelemetry import trace

from otel_bgtasks.cli import demo_app, demo_extra
from otel_bgtasks.cli.receiver import traces_url
from otel_bgtasks.cli.trees import LEGEND, is_task, request_traces, trace_tree, tree_console

with demo_extra():
    import httpx
    import uvicorn
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree
    from starlette.types import ASGIApp

SERVICE = "otel-bgtasks-demo"


def run_demo(otlp_endpoint: str | None = None, console: Console | None = None) -> int:
    """Run the demo against the global tracer provider, setting an SDK one first if there is none."""
    console = console if console is not None else tree_console()
    provider = _sdk_provider()
    if provider is None:
        console.print("[red]The global tracer provider is not the OpenTelemetry SDK's: the demo cannot read its spans.")
        return 1
    # Always keep the spans in memory: the demo waits on them, and prints them unless they go to OTLP.
    memory = InMemorySpanExporter()
    processors: list[SpanProcessor] = [SimpleSpanProcessor(memory)]
    delivery: _Delivery | None = None
    if otlp_endpoint is None:
        console.print(f"[bold]otel-bgtasks demo[/], one tree per request · {LEGEND}")
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

    traces = request_traces(memory.get_finished_spans())
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
        console.print(trace_tree(spans, status, request.shows))
    if logs.records or logs.asgi_tracebacks:
        console.print()
        console.print(logs.tree())
    return 1 if missing else 0


# -- Tracer provider and exporters ----------------------------------------------------------------


def _sdk_provider() -> TracerProvider | None:
    """The global SDK provider: the one already set (say by ``opentelemetry-instrument``), or a new one."""
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
        trace.set_tracer_provider(provider)
        return provider
    return current if isinstance(current, TracerProvider) else None


class _Delivery:
    """Spans sent over OTLP/HTTP, and how many got through, which the batch processor won't say."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = traces_url(endpoint)
        self.sent = 0

    def processor(self) -> SpanProcessor:
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
    """Holds uvicorn's and otel_bgtasks' log records and Python's warnings until the trees are printed.

    Tracebacks are dropped: each failed task is otherwise logged twice with its full traceback, by
    otel_bgtasks ("Background task ... failed") and by uvicorn ("Exception in ASGI application"), and
    the trees already say what failed and why.
    """

    LOGGERS = ("uvicorn.error", "otel_bgtasks", "py.warnings")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.asgi_tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "uvicorn.error" and record.exc_info:
            self.asgi_tracebacks += 1
            return
        # Not kept: the exception would keep its frames alive, and with them, say, a coroutine that
        # warns "never awaited" only when it is freed.
        record.exc_info = None
        self.records.append(record)

    def tree(self) -> Tree:
        """One line per record, tracebacks left out."""
        label = Text.assemble(("Logged meanwhile", "bold"), ", tracebacks left out")
        if self.asgi_tracebacks:
            label.append(f" (and uvicorn's {self.asgi_tracebacks} 'Exception in ASGI application': the ✘ tasks)")
        tree = Tree(label)
        for record in self.records:
            message = record.getMessage()
            if record.name == "py.warnings":  # "file:line: Category: message\n  source line": where it was freed
                message = message.splitlines()[0].split(": ", 1)[-1]
            tree.add(Text(f"{record.levelname} {record.name}: {message}", style="dim"))
        return tree


@contextmanager
def _capture_logs() -> Generator[_LogCapture]:
    """Capture the demo's logs and warnings; on exit, collect garbage first, so that its warnings are in."""
    capture = _LogCapture()
    loggers = [logging.getLogger(name) for name in _LogCapture.LOGGERS]
    saved = [(logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.propagate = False
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    logging.captureWarnings(True)
    try:
        yield capture
    finally:
        gc.collect()
        logging.captureWarnings(False)
        for logger, (propagate, level) in zip(loggers, saved, strict=True):
            logger.removeHandler(capture)
            logger.propagate = propagate
            logger.setLevel(level)


def _serve_and_call(app: ASGIApp, requests: Sequence[demo_app.DemoRequest], memory: InMemorySpanExporter) -> list[str]:
    """Serve ``app`` with uvicorn in a thread, send each request, and stop the server; return the statuses.

    Each request waits for its tasks' spans before the next is sent, so that tasks of different
    requests don't overlap and every run prints the same trees. Stopping the server waits for tasks
    still running.
    """
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
    if not _wait(lambda: sum(is_task(span) for span in memory.get_finished_spans()) >= count, timeout):
        raise RuntimeError(f"the demo's background tasks did not all end within {timeout:g} s")


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll: the server's thread gives no signal to wait on. Returns whether ``condition`` came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True
