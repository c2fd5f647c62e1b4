"""What otel_bgtasks keeps and writes per task function stays bounded, however many functions an app makes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.background import BackgroundTasks

import otel_bgtasks
from otel_bgtasks.naming import listing


def charge() -> None:
    raise ValueError("card declined")


def test_listing_names_the_first_and_counts_the_rest() -> None:
    assert listing([]) == ""
    assert listing(["a", "b"]) == "a, b"
    names = [f"f{i}" for i in range(25)]
    assert listing(names) == ", ".join(names[:20]) + " and 5 more"
    assert listing(names, limit=25) == ", ".join(names)


def test_skipped_warning_is_bounded(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 tasks after one that fails: one WARNING naming the first 20 and counting the rest."""
    otel_bgtasks.instrument(tracer_provider=tracer_provider, sentry=False)
    tasks = BackgroundTasks()
    tasks.add_task(charge)
    for index in range(20_000):
        tasks.add_task(print, index)
    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"), pytest.raises(ValueError, match="card declined"):
        asyncio.run(tasks())

    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped ")]
    assert warning.startswith("Skipped 20000 background task(s) because an earlier task in the same BackgroundTasks")
    assert ": " + ", ".join(["builtins.print"] * 20) + " and 19980 more. To run them anyway" in warning
    assert len(warning) < 1000
    skipped = [s for s in exporter.get_finished_spans() if s.name == "BackgroundTask print"]
    assert len(skipped) == 20_000  # every one still has its span
