"""What travels with a task: its state from creation to run (:class:`TaskState`), and one run (:class:`TaskRun`).

Kept on the ``BackgroundTask`` object itself, under :data:`STATE_ATTRIBUTE`, so that nothing outlives the
task: when Starlette (or the user) drops the task, its captured context goes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import anyio
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span

from otel_bgtasks.blocking import LoopHoldTimer
from otel_bgtasks.naming import FunctionNames, describe

if TYPE_CHECKING:
    from otel_bgtasks.sentry import TaskFailure

STATE_ATTRIBUTE: Final = "_otel_bgtasks_state"


class TaskState:
    """What a task carries from its creation to its run."""

    __slots__ = ("context", "done", "enqueued_ns", "failure", "index", "names", "on_drop", "site")

    def __init__(self, context: Context, enqueued_ns: int | None, names: FunctionNames) -> None:
        self.context = context
        self.enqueued_ns = enqueued_ns
        self.names = names
        self.index: int | None = None
        self.done = False  # ran, or was shown as skipped
        self.site: str | None = None
        self.on_drop: Callable[[TaskState], None] | None = None
        self.failure: TaskFailure | None = None  # for Sentry, once the skipped tasks are known

    def __del__(self) -> None:
        # The task object is gone: if it never ran, nobody else will ever say so.
        if not self.done and self.on_drop is not None:
            with suppress(Exception):  # at interpreter exit logging may be gone: nothing safer is left to do
                self.on_drop(self)


def state_of(task: Any) -> TaskState:
    """The task's state; a task created before ``instrument()`` gets one on first sight."""
    state: TaskState | None = getattr(task, STATE_ATTRIBUTE, None)
    if state is None:
        state = TaskState(otel_context.get_current(), None, describe(task.func))
        setattr(task, STATE_ATTRIBUTE, state)
    return state


class TaskRun:
    """One execution of one task, from its span's start to its end."""

    __slots__ = (
        "execution",
        "handed_off",
        "metric_key",
        "names",
        "queue_duration",
        "scope",
        "span",
        "start_ns",
        "state",
        "task",
        "timeout",
        "timer",
        "token",
        "worker_started",
    )

    def __init__(self, task: Any, state: TaskState, execution: str, span: Span, start_ns: int) -> None:
        self.task = task
        self.state = state
        self.names = names = state.names
        self.execution = execution
        self.span = span
        self.start_ns = start_ns
        self.metric_key = (names.function_name, execution)
        self.token: object = None
        self.timeout: float | None = None
        self.timer: LoopHoldTimer | None = None
        self.scope: anyio.CancelScope | None = None
        self.handed_off = 0.0
        self.worker_started = 0.0
        self.queue_duration: float | None = None

    @property
    def threadpool_wait(self) -> float | None:
        """Seconds a sync task waited for a worker thread; ``None`` until it started on one."""
        return self.worker_started - self.handed_off if self.worker_started else None
