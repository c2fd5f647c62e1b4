"""Opt-in argument capture: off by default, truncated, secrets redacted by name wherever they sit."""

from __future__ import annotations

from typing import Any

from conftest import task_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.background import BackgroundTask

import otel_bgtasks


def login(user: str, password: str, *, options: dict[str, Any] | None = None, **extra: Any) -> None:
    pass


async def test_arguments_are_not_recorded_by_default(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await BackgroundTask(login, "ada", "s3cret")()
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert "background_task.args" not in span.attributes
    assert "s3cret" not in repr(dict(span.attributes)) and "ada" not in repr(dict(span.attributes))


async def test_captured_arguments_are_redacted_and_truncated(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(
        tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=24, redact_keys=["pin"]
    )
    await BackgroundTask(
        login,
        "ada",
        "s3cret",  # positional, but bound to the parameter "password"
        options={"Api-Key": "k-123", "nested": [{"session_id": "abc"}], "colour": "blue"},
        pin="0000",
        note="x" * 100,
    )()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == ("'ada'", "[redacted]")
    kwargs = span.attributes["background_task.kwargs"]
    assert isinstance(kwargs, tuple)
    options, pin, note = kwargs
    assert "k-123" not in options and "abc" not in options
    assert options.startswith("options={'Api-Key': '[redacted]")
    assert pin == "pin=[redacted]"
    assert note.startswith("note='xxxx") and len(note.removeprefix("note=")) <= 24
    assert "s3cret" not in repr(dict(span.attributes))
