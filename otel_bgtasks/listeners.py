"""Subscribers to what happens to tasks: Sentry forwarding, and anything else that wants the reports.

The hot path (wrappers.py) knows only this interface. It calls each listener once a report is complete
(a failed task's run knows which tasks its failure left unrun), and never lets a listener's error reach
the task.
"""

from __future__ import annotations

import threading
from typing import ClassVar

from otel_bgtasks.task_state import TaskRun, TaskState


class TaskListener:
    """Override what you need; every method is called on the thread that ran or dropped the task."""

    # False: task_ended() is called only for runs with something to report (an error, a timeout, a
    # cancellation, a blocked loop), and a task that simply succeeds costs the listener nothing.
    every_end: ClassVar[bool] = True

    def task_created(self, state: TaskState) -> None:
        """A task that can run was created (``add_task``, ``BackgroundTask(...)``); its fate is told later."""

    def task_ended(self, run: TaskRun) -> None:
        """A task ran: ``run.outcome`` says how it ended, ``run.error`` what to report (``None`` if nothing)."""

    def task_skipped(self, state: TaskState, reason: str) -> None:
        """A task never ran because an earlier task of its ``BackgroundTasks`` failed or was cancelled."""

    def task_dropped(self, state: TaskState) -> None:
        """A task was garbage-collected without ever running."""

    def task_invalid(self, state: TaskState, problem: str) -> None:
        """``add_task`` was given something that can never run; ``problem`` says what, and the fix."""

    def task_blocked(self, run: TaskRun) -> None:
        """An ``async def`` task held the event loop for ``blocking_threshold`` or more (``run.blocking_max``)."""


_lock = threading.Lock()
# Read on every task without the lock: replaced whole, never mutated, so a reader sees one version.
active: tuple[TaskListener, ...] = ()
# Those of them that are told of every run, successes included; those that want to hear of each creation.
every_end: tuple[TaskListener, ...] = ()
on_create: tuple[TaskListener, ...] = ()


def add_listener(listener: TaskListener) -> None:
    """Start telling ``listener`` about tasks (once, however often it is added)."""
    with _lock:
        if listener not in active:
            _set_active((*active, listener))


def remove_listener(listener: TaskListener) -> None:
    """Stop telling ``listener``; removing one that was never added does nothing."""
    with _lock:
        _set_active(tuple(item for item in active if item is not listener))


def _set_active(listeners: tuple[TaskListener, ...]) -> None:
    global active, every_end, on_create
    active = listeners
    every_end = tuple(item for item in listeners if item.every_end)
    on_create = tuple(item for item in listeners if type(item).task_created is not TaskListener.task_created)
