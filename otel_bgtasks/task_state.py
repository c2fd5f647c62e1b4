"""What travels with a task: its state from creation to run (:class:`TaskState`), and one run (:class:`TaskRun`).

Kept on the ``BackgroundTask`` object itself, under :data:`STATE_ATTRIBUTE`, so that nothing outlives the
task: when Starlette (or the user) drops the task, its captured context goes with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, Final

import anyio
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span

from otel_bgtasks.blocking import BlockingTimer
from otel_bgtasks.diagnosis import Diagnosis
from otel_bgtasks.naming import FunctionNames, describe

STATE_ATTRIBUTE: Final = "_otel_bgtasks_state"


class TaskState:
    """What a task carries from its creation to its run."""

    __slots__ = (
        "context",
        "enqueued_ns",
        "index",
        "names",
        "on_drop",
        "pending_report",
        "problem",
        "ran",
        "settled",
        "site",
    )

    def __init__(self, context: Context, enqueued_ns: int | None, names: FunctionNames) -> None:
        self.context = context
        self.enqueued_ns = enqueued_ns
        self.names = names
        self.index: int | None = None
        self.settled = False  # its fate is told: it started, was shown as skipped, or could never run
        self.ran = False  # our __call__ wrapper started it (a subclass's own __call__ may bypass it)
        self.site: str | None = None
        self.problem: str | None = None  # why it can never run (add_task(coroutine), a non-callable)
        self.on_drop: Callable[[TaskState], None] | None = None
        # A failed run whose report waits for its BackgroundTasks to say which tasks it left unrun.
        self.pending_report: TaskRun | None = None

    def __del__(self) -> None:
        # The task object is gone: if it never ran, nobody else will ever say so.
        if not self.settled and self.on_drop is not None:
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
    """One execution of one task, from its span's start to its end, and what it came to."""

    __slots__ = (
        "blocking",
        "diagnosis",
        "end_ns",
        "error",
        "execution",
        "handed_off",
        "names",
        "outcome",
        "queue_duration",
        "scope",
        "skipped",
        "span",
        "start_ns",
        "state",
        "task",
        "thread_finished",
        "thread_started",
        "timeout",
        "token",
    )

    def __init__(self, task: Any, state: TaskState, execution: str, span: Span, start_ns: int) -> None:
        self.task = task
        self.state = state
        self.names = state.names
        self.execution = execution
        self.span = span
        self.start_ns = start_ns
        self.end_ns = 0  # set when the run ends
        self.token: object = None
        self.timeout: float | None = None
        self.blocking: BlockingTimer | None = None
        self.scope: anyio.CancelScope | None = None
        # perf_counter() readings around a sync task's trip through the thread pool; 0.0 until reached.
        self.handed_off = 0.0
        self.thread_started = 0.0
        self.thread_finished = 0.0
        self.queue_duration: float | None = None
        self.outcome = ""  # set when the run ends
        self.error: BaseException | None = None  # the failure to report; cleared once reported
        self.diagnosis: Diagnosis | None = None  # why it failed, when that is a known mistake
        self.skipped: Sequence[str] = ()  # tasks of the same BackgroundTasks left unrun because this one failed

    @property
    def threadpool_wait(self) -> float | None:
        """Seconds a sync task waited for a worker thread; ``None`` until it started on one."""
        return self.thread_started - self.handed_off if self.thread_started else None

    @property
    def thread_seconds(self) -> float | None:
        """Seconds a sync task ran on its worker thread; ``None`` unless it got there and returned or raised."""
        return self.thread_finished - self.thread_started if self.thread_finished else None
