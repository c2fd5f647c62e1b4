"""What a test sees of its background tasks: the recorder behind the pytest plugin's ``background_tasks`` fixture.

Every task that ends, is skipped, dropped (garbage-collected unrun) or refused (``add_task`` given a
coroutine object) while a :class:`TaskRecorder` runs becomes a :class:`TaskRecord`. The recorder answers a
test's questions with messages that say what happened. Outside pytest (unittest, a script)::

    from otel_bgtasks.testing import TaskRecorder

    with TaskRecorder() as tasks:
        client.post("/signup", params={"address": "a@example.com"})
    tasks.assert_all_succeeded()

It hears the tasks through listeners.py and needs no span and no SDK. When otel_bgtasks is not instrumented,
it instruments it as a stand-in that sends no telemetry anywhere and changes nothing the tasks do (Starlette's
stop at the first failure, no timeout, no Sentry), and removes it at the end; an ``instrument()`` call by the
app replaces the stand-in, and its options then apply.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic, time_ns
from types import TracebackType
from typing import Any, Final

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider

from otel_bgtasks import semconv
from otel_bgtasks.config import UNSET, Unset, explicit
from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor
from otel_bgtasks.listeners import TaskListener, add_listener, remove_listener
from otel_bgtasks.mistakes import BLOCKING, DROPPED, invalid_task_problem
from otel_bgtasks.naming import describe, error_type, listing, safe_str
from otel_bgtasks.task_state import TaskRun, TaskState

__all__ = ["OUTCOME_INVALID", "TaskCheck", "TaskRecord", "TaskRecorder"]

OUTCOME_INVALID: Final = "invalid"  # add_task() was given something that can never run (a record's outcome only)
_FAILED: Final = frozenset({semconv.OUTCOME_ERROR, semconv.OUTCOME_TIMEOUT})
_AFTER_FAILURE: Final = "an earlier task of its BackgroundTasks failed"
_REASONS: Final = {
    "earlier_task_failed": _AFTER_FAILURE,
    "cancelled": "its BackgroundTasks was cancelled before it ran (the server shutting down, or the client gone)",
}
# Spans and metrics go nowhere: the stand-in only has to tell the listeners. One of each, reused.
_NO_TRACES: Final = NoOpTracerProvider()
_NO_METRICS: Final = NoOpMeterProvider()

Task = str | Callable[..., Any]  # a task's function, or its name: qualname, code.function.name or its tail


@dataclass(eq=False)
class TaskRecord:
    """One task's fate: how a run ended (``success``, ``error``, ``timeout``, ``cancelled``), or why it never ran.

    ``str(record)`` (and its repr) says it in one line, with the error, the hint and the blocking time.
    """

    function_name: str  # code.function.name: module.qualname
    name: str  # the qualname, as in the span name
    outcome: str  # success, error, timeout, cancelled; skipped, dropped or invalid when it never ran
    execution: str | None = None  # "async" or "threadpool"; None when it never ran
    duration: float | None = None  # seconds it ran
    error: BaseException | None = None  # what it raised (error, timeout)
    queue_duration: float | None = None  # seconds from its creation in the request to its start
    threadpool_wait: float | None = None  # def tasks: seconds waiting for a worker thread
    blocking: float | None = None  # async def tasks: the longest it held the event loop without awaiting, seconds
    blocked: bool = False  # blocking reached the blocking threshold
    diagnosis: str | None = None  # a known mistake behind the failure (event_loop_conflict, ...)
    hint: str | None = None  # the fix for that mistake
    left_unrun: tuple[str, ...] = ()  # a failure: the tasks of its BackgroundTasks that it left unrun
    reason: str | None = None  # why it never ran: what skipped it, why it was dropped, what add_task() was given
    site: str | None = None  # file:line of the code that created it

    @property
    def succeeded(self) -> bool:
        """It ran and returned."""
        return self.outcome == semconv.OUTCOME_SUCCESS

    @property
    def failed(self) -> bool:
        """It ran and raised, or ran past its timeout."""
        return self.outcome in _FAILED

    @property
    def problem(self) -> bool:
        """What strict mode fails a test for: anything but a success, and a success that blocked the loop."""
        return not self.succeeded or self.blocked

    def __str__(self) -> str:
        name, outcome, took = self.function_name, self.outcome, _seconds(self.duration)
        if outcome == semconv.OUTCOME_SUCCESS:
            text = f"{name} succeeded in {took}."
        elif outcome == semconv.OUTCOME_ERROR:
            text = f"{name} failed after {took}: {_error(self.error)}."
        elif outcome == semconv.OUTCOME_TIMEOUT:
            text = f"{name} timed out after {took}: {_error(self.error)}."
        elif outcome == semconv.OUTCOME_CANCELLED:
            text = f"{name} was cancelled after {took}."
        elif outcome == semconv.OUTCOME_SKIPPED:
            text = f"{name} was skipped: {self.reason}; Starlette runs no task of a BackgroundTasks after one fails."
        else:  # dropped, invalid: the reason is the whole story, as logged
            text = self.reason or f"{name}: {outcome}."
        if self.hint:
            text += f" Hint: {self.hint}"
        if self.left_unrun:
            text += f" It left unrun: {listing(self.left_unrun)}."
        if self.blocked:
            text += " " + BLOCKING % (name, self.blocking or 0.0)
        return text

    def __repr__(self) -> str:
        return f"<{self}>"


class TaskCheck:
    """The answer of :meth:`TaskRecorder.succeeded` and :meth:`TaskRecorder.failed`: true or false.

    Its repr says what happened either way, so that ``assert background_tasks.succeeded("send_email")``
    fails with the error, the skipped tasks or the names that did run. ``records`` holds the task's records.
    """

    __slots__ = ("_passed", "_text", "records")

    def __init__(self, passed: bool, text: str, records: list[TaskRecord]) -> None:
        self._passed = passed
        self._text = text
        self.records = records

    def __bool__(self) -> bool:
        return self._passed

    def __repr__(self) -> str:
        return self._text

    __str__ = __repr__


class TaskRecorder(TaskListener):
    """Records the fate of every background task while it runs (``start()``/``stop()``, or ``with``).

    Records come from whatever thread runs the task (a TestClient's portal, a uvicorn thread) and from the
    garbage collector (dropped tasks): reading them first collects garbage when a task is unaccounted for.
    """

    def __init__(self, blocking_threshold: float | Unset | None = UNSET) -> None:
        self._blocking_threshold = blocking_threshold
        # Reentrant: a dropped task is told from __del__, which the garbage collector may run in any
        # allocation, also one made while this thread holds the lock.
        self._lock = threading.RLock()
        self._recorded = threading.Condition(self._lock)
        self._records: list[TaskRecord] = []
        self._blocked_runs: set[int] = set()  # id() of runs told blocked, until they are told ended
        self._unsettled: set[int] = set()  # id() of tasks created while recording whose fate is not told yet
        self._started_ns = 0
        self._stand_in: object | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> TaskRecorder:
        """Start recording; instrument otel_bgtasks (as a stand-in) if nothing did."""
        self._started_ns = time_ns()
        add_listener(self)
        self._stand_in = BackgroundTasksInstrumentor().instrument_stand_in(
            tracer_provider=_NO_TRACES,
            meter_provider=_NO_METRICS,
            **explicit(blocking_threshold=self._blocking_threshold),
            # What the tasks do stays Starlette's, whatever OTEL_PYTHON_BGTASKS_* says.
            mode="child",
            continue_on_error=False,
            timeout=None,
            strict=False,
            sentry=False,
            capture_args=False,
            request_metrics_end_at_response=False,
        )
        return self

    def stop(self) -> None:
        """Stop recording (after telling the tasks dropped meanwhile); remove the stand-in instrumentation."""
        try:
            self.settle()
        finally:
            remove_listener(self)
            BackgroundTasksInstrumentor().uninstrument_stand_in(self._stand_in)
            self._stand_in = None
            with self._lock:
                self._blocked_runs.clear()
                self._unsettled.clear()

    def __enter__(self) -> TaskRecorder:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def settle(self) -> None:
        """Collect garbage if a task created while recording is unaccounted for: it may have been dropped."""
        with self._lock:
            unsettled = bool(self._unsettled)
        if unsettled:
            gc.collect()  # a few ms to tens of ms: only when a task may be lying unreferenced in a cycle

    # -- what the listener interface tells ----------------------------------------------------------

    def task_created(self, state: TaskState) -> None:  # noqa: D102
        if state.on_drop is not None:  # else it could not be told dropped: no need to look for it
            with self._lock:
                self._unsettled.add(id(state))

    def owns(self, state: TaskState) -> bool:
        """Whether the task was created while this recorder ran: only such tasks are this recording's.

        With a server that outlives a test (session-scoped), a task queued by one test may end, be skipped
        or be dropped during the next one: it is the test that created it that answers for it. A task
        otel_bgtasks did not see created (created uninstrumented: before any recording) is nobody's.
        """
        created = state.enqueued_ns
        return created is not None and created >= self._started_ns

    def task_ended(self, run: TaskRun) -> None:  # noqa: D102
        if invalid_task_problem(run.task.func) is not None:
            return  # add_task(coroutine) failing as Starlette runs it: task_invalid told the real story
        if not self.owns(run.state):
            with self._lock:
                self._blocked_runs.discard(id(run))
            return
        diagnosis = run.diagnosis
        record = TaskRecord(
            run.names.function_name,
            run.names.qualname,
            run.outcome,
            execution=run.execution,
            duration=(run.end_ns - run.start_ns) / 1e9 if run.end_ns else None,
            error=run.error,
            queue_duration=run.queue_duration,
            threadpool_wait=run.threadpool_wait,
            blocking=run.blocking_max,
            diagnosis=None if diagnosis is None else diagnosis.value,
            hint=None if diagnosis is None else diagnosis.hint,
            left_unrun=tuple(run.skipped),
            site=run.state.site,
        )
        with self._lock:
            if id(run) in self._blocked_runs:  # told just before, by the same thread
                self._blocked_runs.discard(id(run))
                record.blocked = True
            self._unsettled.discard(id(run.state))
            self._name_the_failure(record)
            self._add(record)

    def task_blocked(self, run: TaskRun) -> None:  # noqa: D102
        with self._lock:
            self._blocked_runs.add(id(run))

    def task_skipped(self, state: TaskState, reason: str) -> None:  # noqa: D102
        if not self.owns(state):
            return
        record = self._unrun(state, semconv.OUTCOME_SKIPPED, _REASONS.get(reason, reason))
        with self._lock:
            self._unsettled.discard(id(state))
            self._add(record)

    def task_dropped(self, state: TaskState) -> None:  # noqa: D102
        with self._lock:
            self._unsettled.discard(id(state))
            if not self.owns(state):
                return
            self._add(self._unrun(state, semconv.OUTCOME_DROPPED, DROPPED % (state.names.function_name, state.site)))

    def task_invalid(self, state: TaskState, problem: str) -> None:  # noqa: D102
        if not self.owns(state):
            return
        record = self._unrun(state, OUTCOME_INVALID, f"{problem} (at {state.site})")
        with self._lock:
            self._add(record)

    @staticmethod
    def _unrun(state: TaskState, outcome: str, reason: str) -> TaskRecord:
        names = state.names
        return TaskRecord(names.function_name, names.qualname, outcome, reason=reason, site=state.site)

    def _add(self, record: TaskRecord) -> None:
        self._records.append(record)
        self._recorded.notify_all()

    def _name_the_failure(self, failure: TaskRecord) -> None:
        """Say in the skipped tasks' records which task's failure skipped them (told just before it)."""
        left = list(failure.left_unrun)
        for record in reversed(self._records):
            if not left:
                return
            if record.reason == _AFTER_FAILURE and record.function_name in left:
                left.remove(record.function_name)
                record.reason = f"{failure.function_name} failed before it in the same BackgroundTasks"

    # -- what a test asks ---------------------------------------------------------------------------

    @property
    def records(self) -> list[TaskRecord]:
        """Every task told so far, in the order told."""
        self.settle()
        with self._lock:
            return list(self._records)

    @property
    def skipped(self) -> list[TaskRecord]:
        """Tasks that never ran because an earlier task of their ``BackgroundTasks`` failed (or was cancelled)."""
        return [r for r in self.records if r.outcome == semconv.OUTCOME_SKIPPED]

    @property
    def dropped(self) -> list[TaskRecord]:
        """Tasks garbage-collected without ever running: their ``BackgroundTasks`` never reached a response."""
        return [r for r in self.records if r.outcome == semconv.OUTCOME_DROPPED]

    @property
    def invalid(self) -> list[TaskRecord]:
        """``add_task()`` calls given something that can never run, such as a coroutine object."""
        return [r for r in self.records if r.outcome == OUTCOME_INVALID]

    @property
    def blocked(self) -> list[TaskRecord]:
        """``async def`` runs that held the event loop for the blocking threshold or more."""
        return [r for r in self.records if r.blocked]

    @property
    def problems(self) -> list[TaskRecord]:
        """What strict mode fails a test for: failed, timed out, cancelled, skipped, dropped, invalid, blocked."""
        return [r for r in self.records if r.problem]

    def succeeded(self, task: Task) -> TaskCheck:
        """True when ``task`` ran, and every run of it succeeded; the repr says what happened otherwise."""
        found = self._find(task)
        if not found:
            return TaskCheck(False, self._never_ran(task), found)
        bad = [r for r in found if not r.succeeded]
        if bad:
            return TaskCheck(False, f"{_label(task)} did not succeed: {_lines(bad, ' ')}", found)
        return TaskCheck(True, f"{_label(task)} succeeded ({_runs(found)})", found)

    def failed(self, task: Task) -> TaskCheck:
        """True when a run of ``task`` failed (raised or timed out); ``.records`` holds its records, errors included."""
        found = self._find(task)
        if not found:
            return TaskCheck(False, self._never_ran(task), found)
        failures = [r for r in found if r.failed]
        if failures:
            return TaskCheck(True, f"{_label(task)} failed: {_lines(failures, ' ')}", failures)
        return TaskCheck(False, f"{_label(task)} did not fail: {_lines(found, ' ')}", found)

    def wait_for(self, task: Task, count: int = 1, timeout: float = 10.0) -> TaskRecord:
        """Wait until ``count`` records of ``task`` are told (it ended, or was skipped...); return the last one.

        For a real server, where tasks run after the response and so after the client's call returns.
        """
        __tracebackhide__ = True  # pytest: the failure is the caller's line
        deadline = monotonic() + timeout
        with self._lock:
            while len(found := self._find(task, settle=False)) < count:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    recorded = f"\n- {_lines(self._records)}" if self._records else " none"
                    raise AssertionError(
                        f"{_label(task)} was recorded {len(found)} time(s) in {timeout} s, not {count}. "
                        f"Recorded meanwhile:{recorded}"
                    )
                self._recorded.wait(remaining)
            return found[-1]

    def assert_all_succeeded(self) -> None:
        """Raise ``AssertionError`` naming every task that failed, was skipped, dropped or refused."""
        __tracebackhide__ = True  # pytest: the failure is the caller's line
        records = self.records
        bad = [r for r in records if not r.succeeded]
        if bad:
            raise AssertionError(f"{len(bad)} of {len(records)} background tasks did not succeed:\n- {_lines(bad)}")

    def assert_no_problems(self) -> None:
        """What strict mode checks: :meth:`assert_all_succeeded`, and no task blocked the event loop."""
        __tracebackhide__ = True  # pytest: the failure is the caller's line
        problems = self.problems
        if problems:
            raise AssertionError(f"{len(problems)} background task problem(s):\n- {_lines(problems)}")

    def _find(self, task: Task, settle: bool = True) -> list[TaskRecord]:
        if isinstance(task, str):
            tail = "." + task
            records = self.records if settle else self._records
            return [r for r in records if task in (r.name, r.function_name) or r.function_name.endswith(tail)]
        function_name = describe(task).function_name
        return [r for r in (self.records if settle else self._records) if r.function_name == function_name]

    def _never_ran(self, task: Task) -> str:
        with self._lock:
            recorded = listing([f"{r.function_name} ({r.outcome})" for r in self._records]) or "none"
        return f"{_label(task)} never ran: no task of that name ended, was skipped or dropped. Recorded: {recorded}"

    def __repr__(self) -> str:
        with self._lock:
            return f"<TaskRecorder: {len(self._records)} task(s) recorded>"


def describe_records(records: Iterable[TaskRecord]) -> str:
    """One line per record, each starting with ``- ``: for a failure message or a report section."""
    return "- " + _lines(records)


def _lines(records: Iterable[TaskRecord], separator: str = "\n- ") -> str:
    return separator.join(str(record) for record in records)


def _label(task: Task) -> str:
    return task if isinstance(task, str) else describe(task).function_name


def _runs(records: list[TaskRecord]) -> str:
    return "1 run" if len(records) == 1 else f"{len(records)} runs"


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def _error(error: BaseException | None) -> str:
    if error is None:
        return "no exception"
    message = safe_str(error)
    return f"{error_type(error)}: {message}" if message else error_type(error)
