"""The ``otel_bgtasks`` meter: how many tasks run, how long they take and wait, how they end.

Cost decides the shape. One histogram record costs about half an SDK span, so only durations are
histograms. The active count, the per-outcome count and the blocked count are observable instruments
that read plain counters once per collection: a task pays a dictionary update, not an SDK call.

Bounded: an app that makes its task functions per request (classes made with ``type()``, closures named
after a customer) would otherwise grow every per-function table and every collection without end. Each
instrument has at most :data:`MAX_SERIES` series; past that, a new one is counted in one overflow series
whose only attribute is ``otel.metric.overflow=true``, as the SDK does past its cardinality limit.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
from opentelemetry.util.types import AttributeValue

from otel_bgtasks import semconv
from otel_bgtasks.version import __version__

METER_NAME: Final = "otel_bgtasks"

_Key = tuple[str, str]  # (code.function.name, background_task.execution)
_OutcomeKey = tuple[str, str, str]  # ... and background_task.outcome
_K = TypeVar("_K", _Key, _OutcomeKey)

# Series per instrument before the overflow series: the SDK's default cardinality limit (the specification's).
MAX_SERIES: Final = 2000
OVERFLOW_ATTRIBUTES: Final[dict[str, AttributeValue]] = {semconv.METRIC_OVERFLOW: True}
# Where the counters count the overflow series: no function is named "" (naming.py names the nameless "<unknown>").
_OVERFLOW: Final[_Key] = ("", "")
_OUTCOME_OVERFLOW: Final[_OutcomeKey] = ("", "", "")

# Bucket bounds of the histograms, in seconds: from a millisecond to an hour, three buckets per order of
# magnitude up to 10 s, then by minutes. The SDK's default (0, 5, 10, 25, ... 10000) is meant for
# milliseconds: every task under 5 s would share one bucket, and a p95 could only say "under 5 s".
BUCKET_BOUNDS: Final = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    *(30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
# Given to the SDK as advice, which opentelemetry-api/-sdk take from 1.30; with older ones a View gives the
# same bounds (README, Metrics). A View the application registers wins over the advice in any case.
_BUCKET_ADVICE: Final[dict[str, tuple[float, ...]]] = (
    {"explicit_bucket_boundaries_advisory": BUCKET_BOUNDS}
    if "explicit_bucket_boundaries_advisory" in inspect.signature(metrics.Meter.create_histogram).parameters
    else {}
)

# What a histogram record is given: value, attributes, and the context of the measurement (its exemplar's span).
Record = Callable[[float, dict[str, AttributeValue], Context], None]
# The API takes a measurement's context from 1.27, when the SDK got exemplars; before, there are none.
_RECORD_TAKES_CONTEXT: Final = "context" in inspect.signature(Histogram.record).parameters

# One TaskMetrics per meter provider, for the life of the provider: the SDK hands back the instruments it
# already has for a name, so the observable ones keep calling the first TaskMetrics' callbacks. Reusing it
# across uninstrument()/instrument() keeps their counts live.
_by_provider: weakref.WeakKeyDictionary[MeterProvider, TaskMetrics] = weakref.WeakKeyDictionary()
_by_provider_lock = threading.Lock()


def task_metrics(meter_provider: MeterProvider | None) -> TaskMetrics:
    """The instruments for ``meter_provider`` (the global one if ``None``), created on first use."""
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _by_provider_lock:
        found = _by_provider.get(provider)
        if found is None:
            found = _by_provider[provider] = TaskMetrics(provider)
        return found


class TaskMetrics:
    """The instruments, and the counters behind the observable ones."""

    def __init__(self, meter_provider: MeterProvider | None) -> None:
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider)
        self.duration = meter.create_histogram(
            semconv.METRIC_DURATION,
            unit="s",
            description="Time a background task ran, from start to end.",
            **_BUCKET_ADVICE,
        )
        self.queue_duration = meter.create_histogram(
            semconv.QUEUE_DURATION,
            unit="s",
            description="Time from a background task's creation in the request to its start.",
            **_BUCKET_ADVICE,
        )
        self.threadpool_wait = meter.create_histogram(
            semconv.THREADPOOL_WAIT,
            unit="s",
            description="Time a sync background task waited for a worker thread.",
            **_BUCKET_ADVICE,
        )
        self.record_duration = _recorder(self.duration)
        self.record_wait = _recorder(self.threadpool_wait)
        # Event loops in several threads may update the same counter: a lock keeps each update whole.
        self._lock = threading.Lock()
        self._active: dict[_Key, int] = {}
        self._outcomes: dict[_OutcomeKey, int] = {}
        self._blocked: dict[_Key, int] = {}
        meter.create_observable_up_down_counter(
            semconv.METRIC_ACTIVE,
            callbacks=[self._observe_active],
            unit="{task}",
            description="Background tasks running now.",
        )
        meter.create_observable_counter(
            semconv.METRIC_OUTCOMES,
            callbacks=[self._observe_outcomes],
            unit="{task}",
            description="Background tasks by outcome, skipped and dropped ones included.",
        )
        meter.create_observable_counter(
            semconv.METRIC_BLOCKED,
            callbacks=[self._observe_blocked],
            unit="{task}",
            description="Async background tasks that held the event loop for blocking_threshold or more.",
        )

    def started(self, function_name: str, execution: str) -> None:
        """Count a task as active."""
        key = (function_name, execution)
        with self._lock:
            active = self._active
            count = active.get(key)
            if count is None:
                key, count = _new_series(active, key, _OVERFLOW)
            active[key] = count + 1

    def ended(self, function_name: str, execution: str, outcome: str) -> None:
        """Count a task as no longer active, and as one that ended with ``outcome``: one lock for both."""
        key = (function_name, execution)
        outcome_key = (function_name, execution, outcome)
        with self._lock:
            active, outcomes = self._active, self._outcomes
            count = active.get(key)
            if count is None:  # it started in the overflow series (the table only grows: it still overflows)
                key, count = _new_series(active, key, _OVERFLOW)
            active[key] = count - 1
            count = outcomes.get(outcome_key)
            if count is None:
                outcome_key, count = _new_series(outcomes, outcome_key, _OUTCOME_OVERFLOW)
            outcomes[outcome_key] = count + 1

    def count(self, function_name: str, execution: str, outcome: str) -> None:
        """Count one task that ended with ``outcome``."""
        key = (function_name, execution, outcome)
        with self._lock:
            _increment(self._outcomes, key, _OUTCOME_OVERFLOW)

    def blocked(self, function_name: str, execution: str) -> None:
        """Count one task that held the event loop past the threshold."""
        key = (function_name, execution)
        with self._lock:
            _increment(self._blocked, key, _OVERFLOW)

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observations(self._snapshot(self._active))

    def _observe_blocked(self, options: CallbackOptions) -> Iterable[Observation]:
        return _observations(self._snapshot(self._blocked))

    def _observe_outcomes(self, options: CallbackOptions) -> Iterable[Observation]:
        for key, value in self._snapshot(self._outcomes).items():
            if key == _OUTCOME_OVERFLOW:
                yield Observation(value, OVERFLOW_ATTRIBUTES)
            else:
                yield Observation(value, _attributes(*key))

    def _snapshot(self, counts: dict[_K, int]) -> dict[_K, int]:
        with self._lock:
            return counts.copy()


def _new_series(counts: dict[_K, int], key: _K, overflow: _K) -> tuple[_K, int]:
    """Where a key not counted yet is counted: its own series while there is room, else the overflow series."""
    if len(counts) < MAX_SERIES:
        return key, 0
    return overflow, counts.get(overflow, 0)


def _increment(counts: dict[_K, int], key: _K, overflow: _K) -> None:
    count = counts.get(key)
    if count is None:
        key, count = _new_series(counts, key, overflow)
    counts[key] = count + 1


def _recorder(histogram: Histogram) -> Record:
    """``histogram.record`` itself where it takes the measurement's context; else one that leaves it out."""
    if _RECORD_TAKES_CONTEXT:
        return histogram.record
    return lambda amount, attributes, context: histogram.record(amount, attributes)


def _observations(counts: dict[_Key, int]) -> Iterable[Observation]:
    for key, value in counts.items():
        yield Observation(value, OVERFLOW_ATTRIBUTES if key == _OVERFLOW else _attributes(*key))


class _Series:
    """The histograms' series so far, up to :data:`MAX_SERIES` of each shape; past them, the overflow series.

    A histogram's attributes are made once per function and kept with its names (wrappers.py), whichever
    meter provider records them: so this bound is the process's, not a provider's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[bool, set[tuple[str, str, str | None, str | None]]] = {False: set(), True: set()}

    def admit(self, key: tuple[str, str, str | None, str | None]) -> bool:
        """Whether ``key`` has (or gets now) a series of its own."""
        seen = self._seen[key[2] is None]  # queue and thread-pool wait (no outcome); duration
        if key in seen:
            return True
        with self._lock:
            if len(seen) >= MAX_SERIES:
                return key in seen
            seen.add(key)
            return True


_histogram_series = _Series()


def metric_attributes(
    function_name: str, execution: str, outcome: str | None = None, error_name: str | None = None
) -> dict[str, AttributeValue]:
    """The attributes of a task's histogram points: its function and execution, and how it ended if it did.

    Past :data:`MAX_SERIES` different ones, the overflow series' attributes.
    """
    if not _histogram_series.admit((function_name, execution, outcome, error_name)):
        return OVERFLOW_ATTRIBUTES
    return _attributes(function_name, execution, outcome, error_name)


def _attributes(
    function_name: str, execution: str, outcome: str | None = None, error_name: str | None = None
) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {semconv.CODE_FUNCTION_NAME: function_name, semconv.EXECUTION: execution}
    if outcome is not None:
        attributes[semconv.OUTCOME] = outcome
    if error_name is not None:
        attributes[semconv.ERROR_TYPE] = error_name
    return attributes
