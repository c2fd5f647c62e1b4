"""Every span, event, attribute and metric name otel_bgtasks emits.

These strings are a public contract: dashboards, alerts and tail-sampling rules match on them.
The ``code.*`` and ``error.type`` names are OpenTelemetry semantic conventions; the
``background_task.*`` names are ours, chosen to read like them.
"""

from __future__ import annotations

from typing import Final

SPAN_NAME_PREFIX: Final = "BackgroundTask"

# OpenTelemetry semantic conventions.
CODE_FUNCTION_NAME: Final = "code.function.name"
CODE_FILE_PATH: Final = "code.file.path"
CODE_LINE_NUMBER: Final = "code.line.number"
ERROR_TYPE: Final = "error.type"

# Ours.
EXECUTION: Final = "background_task.execution"
INDEX: Final = "background_task.index"
QUEUE_DURATION: Final = "background_task.queue.duration"
OUTCOME: Final = "background_task.outcome"

EXECUTION_ASYNC: Final = "async"
EXECUTION_THREADPOOL: Final = "threadpool"

OUTCOME_SUCCESS: Final = "success"
OUTCOME_ERROR: Final = "error"
OUTCOME_SKIPPED: Final = "skipped"
OUTCOME_CANCELLED: Final = "cancelled"

# Events.
EVENT_ENQUEUED: Final = "background_task.enqueued"
THREADPOOL_WAIT: Final = "background_task.threadpool.wait"
BLOCKING_MAX: Final = "background_task.blocking.max"
TIMEOUT: Final = "background_task.timeout"
PROBLEM: Final = "background_task.problem"
ARGS: Final = "background_task.args"  # only with capture_args=True
KWARGS: Final = "background_task.kwargs"
DIAGNOSIS: Final = "background_task.diagnosis"  # a known mistake behind a failure (diagnosis.py)

OUTCOME_TIMEOUT: Final = "timeout"
OUTCOME_DROPPED: Final = "dropped"

DIAGNOSIS_EVENT_LOOP_CONFLICT: Final = "event_loop_conflict"
DIAGNOSIS_SESSION_OUTSIDE_REQUEST: Final = "session_outside_request"

EVENT_EVENT_LOOP_BLOCKED: Final = "background_task.event_loop_blocked"
EVENT_INVALID: Final = "background_task.invalid"
EVENT_SESSION_HANDED_OVER: Final = "background_task.session_handed_over"

# Metrics, all under the meter "otel_bgtasks".
METRIC_DURATION: Final = "background_task.duration"
METRIC_QUEUE_DURATION: Final = "background_task.queue.duration"
METRIC_THREADPOOL_WAIT: Final = "background_task.threadpool.wait"
METRIC_ACTIVE: Final = "background_task.active"
METRIC_OUTCOMES: Final = "background_task.outcomes"
