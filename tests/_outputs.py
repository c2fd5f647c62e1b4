"""What otel_bgtasks emitted, as plain JSON-able data with everything that varies from run to run taken out.

For the golden test (test_outputs_unchanged.py): two runs of the same scenario, on any machine, in any
checkout, must give equal data, and any change to a span, an event, an attribute, a metric point or a
log message otel_bgtasks emits must show as a difference.

- Ids become structure: a span's parent is the parent span's name (``"<root>"``, ``"<remote>"``), a link
  the linked span's name; trace and span ids in text become ``<trace_id>``/``<span_id>``.
- Times are dropped; what they say stays: spans and events keep their order, and each event says whether
  its timestamp lies within its span. Measured seconds become ``"<float>"`` (a float >= 0, checked).
- A stack trace keeps its first and last line (the frames are otel_bgtasks' own, which a rewrite moves).
- Paths are relative to the repository; line numbers stay (``code.line.number`` is part of the contract,
  and the tasks live in tests/_golden_tasks.py, which only changes with the golden file).
- Metric points keep name, unit, kind, attributes and a counter's value; of a histogram only the count.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

REPO = Path(__file__).resolve().parents[1]
# Attributes holding measured seconds: their values differ on every run.
MEASURED = {"background_task.queue.duration", "background_task.threadpool.wait", "background_task.blocking.max"}
_VARYING_TEXT = [
    (re.compile(r"\b[0-9a-f]{32}\b"), "<trace_id>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<span_id>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "0x<address>"),
    (re.compile(r"\b\d+\.\d{3} s\b"), "<seconds> s"),  # "ran 0.052 s", "blocked ... for 0.051 s"
]


def text(value: str) -> str:
    """``value`` with the repository's path, ids, addresses and measured seconds replaced by stand-ins."""
    value = value.replace(f"{REPO}/", "")
    for pattern, stand_in in _VARYING_TEXT:
        value = pattern.sub(stand_in, value)
    return value


def attribute(key: str, value: Any) -> Any:
    if key in MEASURED:
        return "<float>" if isinstance(value, float) and value >= 0 else f"not a float >= 0: {value!r}"
    if key == "exception.stacktrace":
        lines = str(value).strip().splitlines()
        return [text(lines[0]), text(lines[-1])]
    if isinstance(value, str):
        return text(value)
    if isinstance(value, (tuple, list)):
        return [attribute(key, item) for item in cast("Sequence[Any]", value)]
    return value


def attributes(values: Any) -> dict[str, Any]:
    return {key: attribute(key, value) for key, value in sorted(dict(values or {}).items())}


def is_task_span(span: ReadableSpan) -> bool:
    return span.name.startswith("BackgroundTask ")


def spans(finished: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    """The task spans whole, and of the request spans (the roots) what otel_bgtasks adds: its events, links.

    Spans of other instrumentations below the request (the ASGI middleware's ``http send``) are left out:
    their shape is that library's, and differs between its releases.
    """
    names = {span.context.span_id: span.name for span in finished if span.context is not None}

    def name_of(context: SpanContext) -> str:
        return names.get(context.span_id, "<remote>" if context.is_remote else "<not among the finished spans>")

    kept: list[dict[str, Any]] = []
    for span in finished:
        is_task = is_task_span(span)
        if not is_task and span.parent is not None and not span.parent.is_remote:
            continue
        events = [
            {
                "name": event.name,
                "attributes": attributes(event.attributes),
                "within_span": (span.start_time or 0) <= event.timestamp <= (span.end_time or 0),
            }
            for event in span.events
            if is_task or event.name.startswith("background_task.")
        ]
        entry: dict[str, Any] = {
            "name": span.name,
            "parent": "<root>" if span.parent is None else name_of(span.parent),
            "links": [name_of(link.context) for link in span.links],
            "events": events,
        }
        if is_task:
            description = span.status.description
            entry["kind"] = span.kind.name
            entry["status"] = [span.status.status_code.name, None if description is None else text(description)]
            entry["attributes"] = attributes(span.attributes)
        kept.append(entry)
    return kept


def metric_points(data: MetricsData | None, scope: str = "otel_bgtasks") -> list[dict[str, Any]]:
    """Every data point of ``scope``'s metrics, sorted: histograms by their count, counters by their value."""
    points: list[dict[str, Any]] = []
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != scope:
                continue
            for metric in scope_metrics.metrics:
                kind = type(metric.data).__name__
                if getattr(metric.data, "is_monotonic", False):
                    kind += " (monotonic)"
                for point in metric.data.data_points:
                    row: dict[str, Any] = {
                        "metric": metric.name,
                        "unit": metric.unit,
                        "kind": kind,
                        "attributes": attributes(point.attributes),
                    }
                    if isinstance(point, HistogramDataPoint):
                        row["count"] = point.count
                    elif isinstance(point, NumberDataPoint):
                        row["value"] = point.value
                    points.append(row)
    return sorted(points, key=lambda row: json.dumps(row, sort_keys=True))


def log_records(records: Iterable[logging.LogRecord], logger: str = "otel_bgtasks") -> list[dict[str, str]]:
    """The records of ``logger``, in order: level and message (its traceback, if any, left out)."""
    return [
        {"level": record.levelname, "message": text(record.getMessage())}
        for record in records
        if record.name == logger or record.name.startswith(f"{logger}.")
    ]
