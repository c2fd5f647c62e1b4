"""What otel_bgtasks keeps and writes per task function stays bounded, however many functions an app makes."""

from __future__ import annotations

import asyncio
import logging

import pytest
from _metrics import metrics_by_name, points
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.background import BackgroundTask, BackgroundTasks

import otel_bgtasks
from otel_bgtasks import identity, metrics
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


BOUND = 5


def job_classes(count: int) -> list[type]:
    """Task functions made per request: a class each, as ``type(f"Job{i}", ...)`` in an app."""

    def __init__(self: object, *args: object) -> None:
        pass

    return [type(f"Job{i}", (), {"__init__": __init__}) for i in range(count)]


async def run_each(tasks: list[type]) -> None:
    for cls in tasks:
        await BackgroundTask(cls)()


def test_per_function_series_are_bounded(tracer_provider: TracerProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """BOUND + 7 functions: each instrument has BOUND series of their own and one overflow series counting the 7."""
    monkeypatch.setattr(metrics, "MAX_SERIES", BOUND)
    monkeypatch.setattr(metrics, "_histogram_series", metrics._Series())  # pyright: ignore[reportPrivateUsage]
    reader = InMemoryMetricReader()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]), sentry=False)
    classes = job_classes(BOUND + 7)
    asyncio.run(run_each(classes))

    found = metrics_by_name(reader)
    overflow = frozenset({("otel.metric.overflow", True)})
    own = [
        frozenset(
            {
                ("code.function.name", f"{__name__}.{cls.__qualname__}"),
                ("background_task.execution", "threadpool"),
                ("background_task.outcome", "success"),
            }
        )
        for cls in classes[:BOUND]
    ]
    outcomes = points(found["background_task.outcomes"])
    assert {key: point.value for key, point in outcomes.items()} == {**dict.fromkeys(own, 1), overflow: 7}
    duration = points(found["background_task.duration"])
    assert {key: point.count for key, point in duration.items()} == {**dict.fromkeys(own, 1), overflow: 7}
    started = [frozenset(k for k in key if k[0] != "background_task.outcome") for key in own]
    active = points(found["background_task.active"])
    assert {key: point.value for key, point in active.items()} == {**dict.fromkeys(started, 0), overflow: 0}
    wait = points(found["background_task.threadpool.wait"])
    assert {key: point.count for key, point in wait.items()} == {**dict.fromkeys(started, 1), overflow: 7}


def test_overflow_series_counts_every_outcome_and_blocked_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counters' tables past the bound: skipped, dropped and blocked tasks go to the overflow series too."""
    monkeypatch.setattr(metrics, "MAX_SERIES", 2)
    counts = metrics.TaskMetrics(MeterProvider([reader := InMemoryMetricReader()]))
    for name in ("a", "b", "c", "d"):
        counts.count(name, "async", "skipped")
        counts.blocked(name, "async")
        counts.started(name, "async")  # still running at collection time

    found = metrics_by_name(reader)
    overflow = frozenset({("otel.metric.overflow", True)})
    outcomes = {key: point.value for key, point in points(found["background_task.outcomes"]).items()}
    assert len(outcomes) == 3 and outcomes[overflow] == 2
    blocked = {key: point.value for key, point in points(found["background_task.blocked"]).items()}
    assert len(blocked) == 3 and blocked[overflow] == 2
    active = {key: point.value for key, point in points(found["background_task.active"]).items()}
    assert len(active) == 3 and active[overflow] == 2


def test_per_callable_caches_are_bounded_when_the_app_keeps_every_callable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names and signatures are remembered per callable while it lives: at most MAX_ENTRIES of them."""
    monkeypatch.setattr(identity, "MAX_ENTRIES", 3)
    computed: list[str] = []
    cache: identity.PerCallable[str] = identity.PerCallable(lambda cls: computed.append(cls.__name__) or cls.__name__)
    kept = job_classes(5)  # the app keeps them all
    for _ in range(2):
        assert [cache.get(cls) for cls in kept] == [f"Job{i}" for i in range(5)]
    assert len(cache) == 3
    assert computed == ["Job0", "Job1", "Job2", "Job3", "Job4", "Job3", "Job4"]  # the last two, each time
