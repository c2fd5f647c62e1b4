"""Every span, event, attribute and metric name otel_bgtasks emits.

These strings are a public contract: dashboards, alerts and tail-sampling rules match on them.
The ``code.*`` and ``error.type`` names are OpenTelemetry semantic conventions; the
``background_task.*`` names are ours, chosen to read like them. A metric that measures what a span
attribute records has the attribute's name.
"""

from __future__ import annotations

from typing import Final

SPAN_NAME_PREFIX: Final = "BackgroundTask"

# Attributes: OpenTelemetry semantic conventions.
CODE_FUNCTION_NAME: Final = "code.function.name"
CODE_FILE_PATH: Final = "code.file.path"
CODE_LINE_NUMBER: Final = "code.line.number"
ERROR_TYPE: Final = "error.type"

# The one attribute of a metric's overflow series, past the bound on distinct series (the SDK's own, as specified:
# https://opentelemetry.io/docs/specs/otel/metrics/sdk/#cardinality-limits).
METRIC_OVERFLOW: Final = "otel.metric.overflow"

# Attributes: ours.
EXECUTION: Final = "background_task.execution"
INDEX: Final = "background_task.index"
QUEUE_DURATION: Final = "background_task.queue.duration"  # also the metric
THREADPOOL_WAIT: Final = "background_task.threadpool.wait"  # also the metric
OUTCOME: Final = "background_task.outcome"
BLOCKING_MAX: Final = "background_task.blocking.max"
TIMEOUT: Final = "background_task.timeout"
PROBLEM: Final = "background_task.problem"
ARGS: Final = "background_task.args"  # only with capture_args=True
KWARGS: Final = "background_task.kwargs"
DIAGNOSIS: Final = "background_task.diagnosis"  # a known mistake behind a failure (diagnosis.py)

# Values of background_task.execution and background_task.outcome.
EXECUTION_ASYNC: Final = "async"
EXECUTION_THREADPOOL: Final = "threadpool"

OUTCOME_SUCCESS: Final = "success"
OUTCOME_ERROR: Final = "error"
OUTCOME_SKIPPED: Final = "skipped"
OUTCOME_CANCELLED: Final = "cancelled"
OUTCOME_TIMEOUT: Final = "timeout"
OUTCOME_DROPPED: Final = "dropped"  # metrics only: a dropped task has no span

# Values of background_task.diagnosis.
DIAGNOSIS_ADD_TASK_MISUSE: Final = "add_task_misuse"
DIAGNOSIS_EVENT_LOOP_CONFLICT: Final = "event_loop_conflict"
DIAGNOSIS_SESSION_OUTSIDE_REQUEST: Final = "session_outside_request"

# Span events.
EVENT_ENQUEUED: Final = "background_task.enqueued"
EVENT_INVALID: Final = "background_task.invalid"
EVENT_LOOP_BLOCKED: Final = "background_task.event_loop_blocked"
EVENT_SESSION_HANDED_OVER: Final = "background_task.session_handed_over"

# Metrics, all under the meter "otel_bgtasks" (and QUEUE_DURATION, THREADPOOL_WAIT above).
METRIC_DURATION: Final = "background_task.duration"
METRIC_ACTIVE: Final = "background_task.active"
METRIC_OUTCOMES: Final = "background_task.outcomes"
METRIC_BLOCKED: Final = "background_task.blocked"
