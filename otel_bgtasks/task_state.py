"""What travels with a task: its state from creation to run (:class:`TaskState`), and one run (:class:`TaskRun`).

Kept outside the ``BackgroundTask`` object, in a dictionary keyed by its ``id()``, so that the app's own
object stays exactly what Starlette made: ``vars()``, ``copy``, ``deepcopy`` and ``pickle`` see nothing of
ours. A weak reference to the task, whose callback is the state itself, removes the entry when the task
is freed (before its memory can be reused by another object, so an ``id()`` never finds a stranger's
state), and says so if the task never ran: nothing outlives the task, and its captured context goes with
it. Cheaper than a ``WeakKeyDictionary`` (no hashing of the task, no per-lookup weak reference), and the
callback replaces the ``__del__`` the state had when it lived on the task.

A copy of a task (``copy``, ``deepcopy``, ``pickle``) carries no telemetry state: like a task made before
``instrument()``, it gets a state when it runs, parented to whatever is current then.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Sequence
from contextlib import suppress
from types import CoroutineType
from typing import Any, Protocol

import anyio
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span

from otel_bgtasks.diagnosis import Diagnosis
from otel_bgtasks.naming import FunctionNames, describe


class DropWatcher(Protocol):
    """Who is told when a task is garbage-collected without having run (the wrappers that saw it made)."""

    def task_dropped(self, state: TaskState) -> None:
        """``state``'s task was garbage-collected without having run."""


class TaskState:
    """What a task carries from its creation to its run."""

    __slots__ = (
        "context",
        "coroutine",
        "enqueued_ns",
        "index",
        "is_async",
        "key",
        "names",
        "on_drop",
        "pending_report",
        "problem",
        "ran",
        "ref",
        "settled",
        "where",
    )

    def __init__(
        self,
        task: object,
        context: Context,
        enqueued_ns: int | None,
        names: FunctionNames,
        where: tuple[str, int] | None = None,
        on_drop: DropWatcher | None = None,
        is_async: bool = False,
    ) -> None:
        self.context = context
        self.enqueued_ns = enqueued_ns
        self.names = names
        self.where = where  # (file, line) that created it; formatted only when someone asks for the site
        self.on_drop = on_drop
        self.is_async = is_async  # Starlette's own judgement at creation: a dropped task is counted under it
        self.index: int | None = None
        self.settled = False  # its fate is told: it started, was shown as skipped, or could never run
        self.ran = False  # our __call__ wrapper started it (a subclass's own __call__ may bypass it)
        self.problem: str | None = None  # why it can never run (add_task(coroutine), a non-callable)
        # A failed run whose report waits for its BackgroundTasks to say which tasks it left unrun.
        self.pending_report: TaskRun | None = None
        # add_task(coroutine object): the coroutine, weakly, to close when the task is freed if nothing else holds it.
        self.coroutine: weakref.ref[CoroutineType[Any, Any, Any]] | None = None
        self.key = id(task)
        self.ref: weakref.ref[Any] | None = None
        if task is not None:  # None: a passing state, for something in a task list that is not a BackgroundTask
            self.ref = weakref.ref(task, self)  # calls self when the task is freed
            states[self.key] = self

    @property
    def site(self) -> str | None:
        """``file:line`` of the code that created the task, if it was seen being created."""
        return None if self.where is None else f"{self.where[0]}:{self.where[1]}"

    def __call__(self, ref: weakref.ref[Any]) -> None:
        """The task was freed (the weak reference's callback, in whichever thread freed it)."""
        if states.get(self.key) is self:
            del states[self.key]
        if self.settled and self.coroutine is None:  # it ran, or its fate was told: the usual case, kept short
            return
        with suppress(Exception):  # at interpreter exit logging may be gone: nothing safer is left to do
            coroutine = None if self.coroutine is None else self.coroutine()
            if coroutine is not None:
                close_if_unheld(coroutine)
            # If it never ran, nobody else will ever say so. add_task(coroutine) too: told at the call, it is
            # counted dropped all the same (one outcome per task), without a second report.
            if not self.settled and self.on_drop is not None:
                self.settled = True
                self.on_drop.task_dropped(self)


# id(task) -> its state, while the task lives (see the module's docstring); read it, add to it only by TaskState().
states: dict[int, TaskState] = {}


def state_of(task: Any) -> TaskState:
    """The task's state; a task created before ``instrument()`` (or a copy) gets one on first sight."""
    state = states.get(id(task))
    if state is None:
        state = TaskState(task, otel_context.get_current(), None, describe(task.func))
    return state


def known_state(task: object) -> TaskState | None:
    """The task's state if it has one, without making one (a task being freed has none any more)."""
    return states.get(id(task))


def close_if_unheld(coroutine: object) -> None:
    """Close an ``add_task(coroutine)`` coroutine that was never started and that only its task and the caller hold.

    Python would warn "coroutine ... was never awaited" as it is freed; otel_bgtasks' ERROR at the
    ``add_task`` call said so already, with the fix. One held anywhere else (the app awaits it, or gave it
    to ``asyncio.create_task``) is left alone: closing it would break the app's own await. The count is
    CPython's reference count, compared with what the same call shape counts for an object held by one
    container and one local (:func:`_calibrate`): anything but exactly that leaves it alone.
    """
    if not inspect.iscoroutine(coroutine) or inspect.getcoroutinestate(coroutine) != inspect.CORO_CREATED:
        return
    if _refs(coroutine) == _TASK_AND_CALLER:
        coroutine.close()


def _refs(obj: object) -> int:
    return sys.getrefcount(obj)


def _twin(coroutine: object) -> int:
    """What close_if_unheld() counts, in the same call shape."""
    return _refs(coroutine)


def _calibrate() -> int:
    holder = [object()]  # the task's __dict__
    probe = holder[0]  # the caller's local
    return _twin(probe)


_TASK_AND_CALLER = _calibrate()


class ThreadTimings:
    """``perf_counter()`` readings around a sync task's trip through the thread pool; 0.0 until reached."""

    __slots__ = ("finished", "handed_off", "returned", "started")

    def __init__(self) -> None:
        self.handed_off = 0.0
        self.started = 0.0
        self.finished = 0.0
        self.returned: str | None = None  # what the function returned, if an async body that never ran

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
