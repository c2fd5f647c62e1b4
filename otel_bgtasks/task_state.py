"""What travels with a task: its state from creation to run (:class:`TaskState`), and one run (:class:`TaskRun`).

Kept on the ``BackgroundTask`` object itself, under :data:`STATE_ATTRIBUTE`, so that nothing outlives the
task: when Starlette (or the user) drops the task, its captured context goes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Final, Protocol

import anyio
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span

from otel_bgtasks.diagnosis import Diagnosis
from otel_bgtasks.naming import FunctionNames, describe

STATE_ATTRIBUTE: Final = "_otel_bgtasks_state"


class DropWatcher(Protocol):
    """Who is told when a task is garbage-collected without having run (the wrappers that saw it made)."""

    def task_dropped(self, state: TaskState) -> None:
        """``state``'s task was garbage-collected without having run."""


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
        "where",
    )

    def __init__(
        self,
        context: Context,
        enqueued_ns: int | None,
        names: FunctionNames,
        where: tuple[str, int] | None = None,
        on_drop: DropWatcher | None = None,
    ) -> None:
        self.context = context
        self.enqueued_ns = enqueued_ns
        self.names = names
        self.where = where  # (file, line) that created it; formatted only when someone asks for the site
        self.on_drop = on_drop
        self.index: int | None = None
        self.settled = False  # its fate is told: it started, was shown as skipped, or could never run
        self.ran = False  # our __call__ wrapper started it (a subclass's own __call__ may bypass it)
        self.problem: str | None = None  # why it can never run (add_task(coroutine), a non-callable)
        # A failed run whose report waits for its BackgroundTasks to say which tasks it left unrun.
        self.pending_report: TaskRun | None = None

    @property
    def site(self) -> str | None:
        """``file:line`` of the code that created the task, if it was seen being created."""
        return None if self.where is None else f"{self.where[0]}:{self.where[1]}"

    def __del__(self) -> None:
        # The task object is gone: if it never ran, nobody else will ever say so.
        if not self.settled and self.on_drop is not None:
            with suppress(Exception):  # at interpreter exit logging may be gone: nothing safer is left to do
                self.on_drop.task_dropped(self)


def state_of(task: Any) -> TaskState:
    """The task's state; a task created before ``instrument()`` gets one on first sight."""
    state: TaskState | None = getattr(task, STATE_ATTRIBUTE, None)
    if state is None:
        state = TaskState(otel_context.get_current(), None, describe(task.func))
        setattr(task, STATE_ATTRIBUTE, state)
    return state


class ThreadTimings:
    """``perf_counter()`` readings around a sync task's trip through the thread pool; 0.0 until reached."""

    __slots__ = ("finished", "handed_off", "started")

    def __init__(self) -> None:
        self.handed_off = 0.0
        self.started = 0.0
        self.finished = 0.0

    @property
    def wait(self) -> float | None:
        """Seconds the task waited for a worker thread; ``None`` until it started on one."""
        return self.started - self.handed_off if self.started else None


class TaskRun:
    """One execution of one task, from its span's start to its end, and what it came to.

    Made when a run has something to tell (an error, a listener to tell, a timeout or a blocked loop to
    judge): a task that simply succeeds is ended without one.
    """

    __slots__ = (
        "blocking_max",
        "diagnosis",
        "end_ns",
        "error",
        "execution",
        "names",
        "outcome",
        "queue_duration",
        "scope",
        "skipped",
        "span",
        "start_ns",
        "state",
        "task",
        "timeout",
        "timings",
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
        self.blocking_max: float | None = None  # longest hold of the event loop, for a timed async task
        self.scope: anyio.CancelScope | None = None
        self.timings: ThreadTimings | None = None  # a sync task's trip through the thread pool
        self.queue_duration: float | None = None
        self.outcome = ""  # set when the run ends
        self.error: BaseException | None = None  # the failure to report; cleared once reported
        self.diagnosis: Diagnosis | None = None  # why it failed, when that is a known mistake
        self.skipped: Sequence[str] = ()  # tasks of the same BackgroundTasks left unrun because this one failed

    @property
    def threadpool_wait(self) -> float | None:
        """Seconds a sync task waited for a worker thread; ``None`` until it started on one."""
        return None if self.timings is None else self.timings.wait

    @property
    def thread_seconds(self) -> float | None:
        """Seconds a sync task ran on its worker thread; ``None`` unless it got there and returned or raised."""
        timings = self.timings
        return timings.finished - timings.started if timings is not None and timings.finished else None
