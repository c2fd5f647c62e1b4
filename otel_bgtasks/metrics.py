"""The ``otel_bgtasks`` meter: how many tasks run, how long they take and wait, how they end.

Cost decides the shape. One histogram record costs about half an SDK span, so only durations are
histograms. The active count and the per-outcome count are observable instruments that read plain
counters once per collection: a task pays a dictionary update, not an SDK call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.util.types import AttributeValue

from otel_bgtasks import semconv
from otel_bgtasks.version import __version__

METER_NAME: Final = "otel_bgtasks"

_Key = tuple[str, str]  # (code.function.name, background_task.execution)
_OutcomeKey = tuple[str, str, str]  # ... and background_task.outcome


class TaskMetrics:
    """The instruments, and the counters behind the observable ones."""

    def __init__(self, meter_provider: MeterProvider | None) -> None:
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider)
        self.duration = meter.create_histogram(
            semconv.METRIC_DURATION, unit="s", description="Time a background task ran, from start to end."
        )
        self.queue_duration = meter.create_histogram(
            semconv.METRIC_QUEUE_DURATION,
            unit="s",
            description="Time from a background task's creation in the request to its start.",
        )
        self.threadpool_wait = meter.create_histogram(
            semconv.METRIC_THREADPOOL_WAIT,
            unit="s",
            description="Time a sync background task waited for a worker thread.",
        )
        self._active: dict[_Key, int] = {}
        self._outcomes: dict[_OutcomeKey, int] = {}
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

    # Called on the event loop for every task; the GIL makes each update whole.
    def started(self, key: _Key) -> None:
        """Count a task as active."""
        self._active[key] = self._active.get(key, 0) + 1

    def ended(self, key: _Key) -> None:
        """Count a task as no longer active."""
        self._active[key] -= 1

    def count(self, function_name: str, execution: str, outcome: str) -> None:
        """Count one task that ended with ``outcome``."""
        key = (function_name, execution, outcome)
        self._outcomes[key] = self._outcomes.get(key, 0) + 1

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        for (function_name, execution), value in self._active.copy().items():
            yield Observation(value, {semconv.CODE_FUNCTION_NAME: function_name, semconv.EXECUTION: execution})

    def _observe_outcomes(self, options: CallbackOptions) -> Iterable[Observation]:
        for (function_name, execution, outcome), value in self._outcomes.copy().items():
            attributes: dict[str, AttributeValue] = {
                semconv.CODE_FUNCTION_NAME: function_name,
                semconv.EXECUTION: execution,
                semconv.OUTCOME: outcome,
            }
            yield Observation(value, attributes)
