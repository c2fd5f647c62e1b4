"""Telemetry providers that fail on demand, for otel_bgtasks only: the faults the real SDKs cannot produce.

Every other user of the provider (the request spans, the ASGI middleware's metrics) keeps working, so a
test sees exactly what a broken exporter or SDK bug inside otel_bgtasks would do to an app: nothing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpCounter, NoOpHistogram, NoOpMeter, NoOpMeterProvider, NoOpUpDownCounter


class TracerDown(trace.NoOpTracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("tracer down")


class TracerDownForOtelBgtasks(trace.TracerProvider):
    """A real SDK provider for everyone (request spans included), except otel_bgtasks' own tracer."""

    def __init__(self, real: trace.TracerProvider) -> None:
        self._real = real

    def get_tracer(self, instrumenting_module_name: str, *args: Any, **kwargs: Any) -> trace.Tracer:
        if instrumenting_module_name.startswith("otel_bgtasks"):
            return TracerDown()
        return self._real.get_tracer(instrumenting_module_name, *args, **kwargs)


class HistogramDown(NoOpHistogram):
    def record(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("histogram down")


class CounterDown(NoOpCounter):
    def add(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("counter down")


class UpDownCounterDown(NoOpUpDownCounter):
    def add(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("up-down counter down")


class MeterDown(NoOpMeter):
    def create_histogram(self, name: str, *args: Any, **kwargs: Any) -> NoOpHistogram:
        return HistogramDown(name)

    def create_counter(self, name: str, *args: Any, **kwargs: Any) -> NoOpCounter:
        return CounterDown(name)

    def create_up_down_counter(self, name: str, *args: Any, **kwargs: Any) -> NoOpUpDownCounter:
        return UpDownCounterDown(name)


class MeterDownForOtelBgtasks(NoOpMeterProvider):
    """Every instrument of otel_bgtasks' meter raises; other meters (the ASGI middleware's) work."""

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> NoOpMeter:
        return MeterDown(name) if name.startswith("otel_bgtasks") else NoOpMeter(name)
