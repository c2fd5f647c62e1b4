"""Reading otel_bgtasks' metrics back from an ``InMemoryMetricReader``."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric


def metrics_by_name(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every metric of otel_bgtasks' meter (scope ``otel_bgtasks``) collected now, by name."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "otel_bgtasks"
        for metric in scope.metrics
    }


def points(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    """The data points of ``metric``, by their attributes."""
    return {frozenset((point.attributes or {}).items()): point for point in metric.data.data_points}
