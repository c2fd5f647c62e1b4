"""Shared fixtures: one real SDK tracer provider for the session, a clean exporter and patch state per test."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_bgtasks

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
# The global provider can be set once per process; FastAPI's native telemetry and contrib's
# instrumentors read it, so every test shares this one and gets a cleared exporter.
trace.set_tracer_provider(_provider)


# FastAPI >= 0.163 traces requests and tasks itself; older releases accept (and ignore) ``telemetry=``.
HAS_NATIVE_TELEMETRY = "telemetry" in inspect.signature(FastAPI).parameters
needs_native_telemetry = pytest.mark.skipif(
    not HAS_NATIVE_TELEMETRY, reason="this FastAPI has no native telemetry (added in 0.163)"
)


def with_native(values: list[str]) -> list[object]:
    """``parametrize`` values, those naming a native-telemetry setup skipped where FastAPI has none."""
    return [pytest.param(v, marks=needs_native_telemetry) if "native" in v else v for v in values]


@pytest.fixture
def tracer_provider() -> TracerProvider:
    return _provider


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture(autouse=True)
def _clean_patches() -> Iterator[None]:
    """Every test starts and ends uninstrumented, whatever it did."""
    otel_bgtasks.uninstrument()
    yield
    otel_bgtasks.uninstrument()


def task_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("BackgroundTask ")]


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]
