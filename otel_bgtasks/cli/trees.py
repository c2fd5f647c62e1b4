"""Spans to rich trees: one request's trace, its task spans with what happened to them, and what ran inside.

Used by ``otel-bgtasks demo`` and ``otel-bgtasks watch``. Takes the SDK's ``ReadableSpan`` (watch decodes
the spans it receives into them); nothing here needs a tracer provider.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

from opentelemetry.trace import SpanKind, StatusCode

from otel_bgtasks import semconv
from otel_bgtasks.cli import demo_extra

with demo_extra():
    from opentelemetry.sdk.trace import ReadableSpan
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

TASK_PREFIX = semconv.SPAN_NAME_PREFIX + " "
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
LEGEND = "tasks: [green]✔ success[/] [red]✘ error[/] [yellow]⏭ skipped[/] · run time · queued · async|threadpool"


def tree_console() -> Console:
    """A console for the trees: the terminal's width, or 120 columns when piped (rich would wrap at 80)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120
    return console


def is_task(span: ReadableSpan) -> bool:
    """Whether ``span`` is an otel_bgtasks task span."""
    return span.name.startswith(TASK_PREFIX)


def group_traces(spans: Iterable[ReadableSpan]) -> list[list[ReadableSpan]]:
    """The spans of each trace, earliest trace first.

    In ``mode="link"`` a task starts a trace of its own, linked to the span that queued it: that trace
    is folded into the trace of the span it links to, when that span is among ``spans``.
    """
    by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        by_trace[trace_id_of(span)].append(span)
    trace_of = {_span_id(span): trace_id for trace_id, trace_spans in by_trace.items() for span in trace_spans}
    folded_into: dict[int, int] = {}
    for trace_id, trace_spans in by_trace.items():
        root = roots(trace_spans)[0]
        linked = [trace_of[link.context.span_id] for link in root.links if link.context.span_id in trace_of]
        if root.kind is not SpanKind.SERVER and linked and linked[0] != trace_id:
            folded_into[trace_id] = linked[0]
    groups: dict[int, list[ReadableSpan]] = defaultdict(list)
    for trace_id, trace_spans in by_trace.items():
        seen = {trace_id}
        while trace_id in folded_into and folded_into[trace_id] not in seen:  # a linked trace's linked trace
            trace_id = folded_into[trace_id]
            seen.add(trace_id)
        groups[trace_id].extend(trace_spans)
    return sorted(groups.values(), key=lambda group: roots(group)[0].start_time or 0)


def request_span(spans: Sequence[ReadableSpan]) -> ReadableSpan | None:
    """The trace's request: its root, when that is a server span."""
    root = roots(spans)[0]
    return root if root.kind is SpanKind.SERVER else None


def request_traces(spans: Iterable[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    """The spans of each trace that starts at a request (a server span), by the request's path.

    Other traces (the tables created at startup) are left out.
    """
    by_path: dict[str, list[ReadableSpan]] = {}
    for trace_spans in group_traces(spans):
        request = request_span(trace_spans)
        attributes = request.attributes or {} if request is not None else {}
        path = attributes.get("url.path", attributes.get("http.target"))
        if isinstance(path, str):
            by_path[path] = trace_spans
    return by_path


def _span_id(span: ReadableSpan) -> int:
    return span.context.span_id if span.context is not None else 0


def trace_id_of(span: ReadableSpan) -> int:
    """The span's trace id."""
    return span.context.trace_id if span.context is not None else 0


def roots(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """Spans whose parent is not among ``spans``, earliest first."""
    ids = {_span_id(span) for span in spans}
    found = [span for span in spans if span.parent is None or span.parent.span_id not in ids]
    return sorted(found, key=lambda span: span.start_time or 0)


def _parent_id(span: ReadableSpan, ids: set[int]) -> int | None:
    """The span's parent in the tree: its real parent, or for a linked trace's root, the span it links to."""
    if span.parent is not None and span.parent.span_id in ids:
        return span.parent.span_id
    for link in span.links:
        if link.context.span_id in ids:
            return link.context.span_id
    return None


def response_status(request: ReadableSpan) -> str:
    """The HTTP status code a request span recorded (stable or old semantic conventions), or ``?``."""
    attributes = request.attributes or {}
    return str(attributes.get("http.response.status_code", attributes.get("http.status_code", "?")))


def trace_tree(spans: Sequence[ReadableSpan], status: str | None = None, note: str | None = None) -> Tree:
    """One trace as a tree: its request span at the root, or, for tasks with no request span, the tasks.

    ``status``: the response's status (by default the one the request span recorded); ``note``: a
    line under the root, saying what the trace shows.
    """
    ids = {_span_id(span) for span in spans}
    children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
    for span in sorted(spans, key=lambda span: span.start_time or 0):
        children[_parent_id(span, ids)].append(span)
    request = request_span(spans)
    if request is None:
        top = children[None]
        if top[0].parent is not None:  # its parent was in spans printed and let go before
            label = Text("Spans that ended late", style="bold cyan")
            label.append(": their trace's tree was printed earlier", style="dim")
        else:
            label = Text("No request span", style="bold cyan")
            label.append(
                ": nothing traces this app's requests (call otel_bgtasks.instrument(app), or install the "
                "OpenTelemetry instrumentation of its framework)",
                style="dim",
            )
    else:
        status = response_status(request) if status is None else status
        label = Text.assemble((request.name, "bold cyan"), f" → {status}  {_ms(request.start_time, request.end_time)}")
        trace_end = max(span.end_time or 0 for span in spans)
        if trace_end > (request.end_time or 0):
            label.append(f"  (its tasks ran until +{_ms(request.start_time, trace_end)})", style="dim")
        top = children[_span_id(request)]
    if note is not None:
        label.append(f"\n{note}", style="italic")
    tree = Tree(label)

    def add(parent: Tree, span: ReadableSpan) -> None:
        kids = children[_span_id(span)]
        if span.name.endswith(_HIDDEN_SUFFIXES) or (span.name in _HIDDEN_LEAVES and not kids):
            return
        node = parent.add(_label(span))
        _add_details(node, span)
        for kid in kids:
            add(node, kid)

    if request is not None:
        _add_details(tree, request)  # a route with no span of its own records its events on the request span
    for span in top:
        add(tree, span)
    return tree


def _add_details(node: Tree, span: ReadableSpan) -> None:
    """Under the span's line: its error, and what otel_bgtasks' events on it warn about."""
    if span.status.status_code is StatusCode.ERROR:
        error = str((span.attributes or {}).get(semconv.ERROR_TYPE, "error"))
        description = span.status.description
        node.add(Text(f"{error}: {description}" if description else error, style="red"))
    for warning in _warnings(span):
        node.add(Text(f"⚠ {warning}", style="yellow"))


def _warnings(span: ReadableSpan) -> list[str]:
    """What otel_bgtasks' events on ``span`` warn about: a blocked loop, an invalid task, a session handed over."""
    warnings: list[str] = []
    for event in span.events:
        attributes = event.attributes or {}
        if event.name == semconv.EVENT_LOOP_BLOCKED:
            held = attributes.get(semconv.BLOCKING_MAX)
            seconds = f" for {held * 1e3:.0f} ms" if isinstance(held, float) else ""
            warnings.append(f"blocked the event loop{seconds} without awaiting: nothing else on the loop ran meanwhile")
        elif event.name == semconv.EVENT_INVALID:
            warnings.append(f"invalid task: {attributes.get(semconv.PROBLEM)}")
        elif event.name == semconv.EVENT_SESSION_HANDED_OVER:
            warnings.append(f"given the request's database session or ORM objects: {attributes.get(semconv.PROBLEM)}")
    return warnings


def _ms(start: int | None, end: int | None) -> str:
    return f"{((end or 0) - (start or 0)) / 1e6:.1f} ms"


def _label(span: ReadableSpan) -> Text:
    attributes = span.attributes or {}
    if not is_task(span):
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
    diagnosis = attributes.get(semconv.DIAGNOSIS)
    if diagnosis is not None:
        label.append(f"  diagnosis={diagnosis}", style="bold yellow")
    return label
