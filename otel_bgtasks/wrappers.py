"""The wrappers around Starlette's ``BackgroundTask`` and ``BackgroundTasks``: the hot path.

Every background task runs through :meth:`TaskWrappers.init_task` (when it is created, in the
request) and :meth:`TaskWrappers._run` (when it runs, after the response), which ``BackgroundTasks``
(:meth:`TaskWrappers.call_tasks`) calls directly for a plain ``BackgroundTask`` and the
``BackgroundTask.__call__`` wrapper (:meth:`TaskWrappers.call_task`) for the others. The task's own
call, return value and exception pass through untouched; all the telemetry work around it is guarded
so that a failure here leaves the task running as if uninstrumented. What happened is told to the
listeners (listeners.py) and logged; this module knows nothing of who listens.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
import traceback
import types
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from time import perf_counter, time_ns
from typing import Any, Final

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from otel_bgtasks import listeners, semconv, setup_checks
from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.config import Options
from otel_bgtasks.diagnosis import Diagnosis, diagnose, handed_over_session, misuse, warn_handed_over_session
from otel_bgtasks.guard import capture_internal_exceptions, internal_error
from otel_bgtasks.install import NO_STARLETTE
from otel_bgtasks.metrics import TaskMetrics, metric_attributes
from otel_bgtasks.mistakes import (
    BLOCKING,
    DiscardedCoroutineError,
    creation_site,
    discarded_awaitable,
    discarded_problem,
    invalid_task_problem,
    report_dropped,
)
from otel_bgtasks.naming import FunctionNames, describe, error_type, listing, safe_str
from otel_bgtasks.request_metrics import response_complete
from otel_bgtasks.setup_checks import check_first_task
from otel_bgtasks.task_state import (
    TaskRun,
    TaskState,
    ThreadTimings,
    close_if_unheld,
    known_state,
    state_of,
    states,
)
from otel_bgtasks.version import __version__

try:
    from starlette import background as _background
except ImportError as exc:  # Starlette is the app's to install (the `instruments` extra), as in contrib's packages
    raise ImportError(NO_STARLETTE, name=exc.name) from exc

_logger = logging.getLogger("otel_bgtasks")
# Off the hot path, ``with _guard:``; on it, ``try``/``except Exception`` around internal_error(), which costs
# nothing until something fails.
_guard = capture_internal_exceptions()

_BackgroundTask = _background.BackgroundTask
# opentelemetry-instrumentation-fastapi's module: its BackgroundTask.__call__ is bypassed (contrib_fastapi.py).
CONTRIB_FASTAPI: Final = "opentelemetry.instrumentation.fastapi"
_BackgroundTasks = _background.BackgroundTasks

# A sync task's thread-pool timings, carried in the OpenTelemetry context we attach anyway, for the
# run_in_threadpool() wrapper to find when something else wraps Starlette's __call__ inside ours.
_TIMINGS_KEY: Final = otel_context.create_key("otel_bgtasks.thread_timings")

_Wrapped = Callable[..., Awaitable[Any]]


class TaskWrappers:
    """The wrapt wrappers, bound to one tracer, one set of instruments and one set of options."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        task_metrics: TaskMetrics,
        options: Options,
        arguments: ArgumentCapture | None = None,
    ) -> None:
        self._explicit_provider = tracer_provider is not None
        self._tracer = _tracer(tracer_provider)
        # A no-op provider given: spans are asked to go nowhere (the pytest plugin's instrumentation).
        self._spans_recorded = self._explicit_provider and not isinstance(tracer_provider, trace.NoOpTracerProvider)
        self._metrics = task_metrics
        self._options = options
        self._arguments = arguments  # None unless the user opted in with capture_args=True
        self._link_mode = options.mode == "link"
        # opentelemetry-instrumentation-fastapi, when it patched BackgroundTask.__call__ before us, would
        # open a second, bare span inside ours: the original it kept, Starlette's, is what we run instead
        # (see contrib_fastapi.py and claim_call()).
        self.bypass_call: _Wrapped | None = None
        self._installed_call: object = None  # our BackgroundTask.__call__ wrapper: see claim_call()
        self._wraps_starlette = False
        self._warned_blocking: set[str] = set()
        # Set by uninstrument(): a task created before and run after it was never seen to start.
        self.retired = False

    def follow(self, tracer_provider: trace.TracerProvider) -> None:
        """Send task spans where the app's request spans go, unless instrument() was given a provider."""
        if not self._explicit_provider:
            self._tracer = _tracer(tracer_provider)
            self._spans_recorded = True

    def _follow_queuing_app(self, creating: Context) -> None:
        """No provider given, none followed, no SDK: follow the one FastAPI's native telemetry has for this request.

        ``instrument()`` called without the app cannot see ``FastAPI(telemetry={"tracer_provider": ...})``;
        the first task queued in a request FastAPI traces shows it (see queuing_apps_provider). Asked only
        while task spans go nowhere: once they go somewhere, never again.
        """
        if self.spans_recorded():
            return
        from otel_bgtasks.request_spans import queuing_apps_provider  # imports contrib's ASGI middleware: when needed

        provider = queuing_apps_provider(creating)
        if provider is not None:
            self.follow(provider)

    def spans_recorded(self) -> bool:
        """Whether task spans go anywhere: a provider was given or followed, or an SDK set the global one."""
        if not self._spans_recorded and not self._explicit_provider:
            # Set once per process: when it is no longer the API's default, it stays so.
            provider = trace.get_tracer_provider()
            self._spans_recorded = not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        return self._spans_recorded

    # -- creation ---------------------------------------------------------------------------------

    def init_task(
        self, wrapped: Callable[..., None], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """``BackgroundTask.__init__``: remember the creating context, and say so on the creating span."""
        wrapped(*args, **kwargs)
        problem = None
        try:
            func = instance.func
            state = TaskState(
                instance,
                otel_context.get_current(),
                time_ns(),
                describe(func),
                creation_site(sys._getframe(1)),  # pyright: ignore[reportPrivateUsage]
                # Who to tell if it is dropped; nobody for a subclass whose own __call__ may run it unseen.
                None if _overrides_call(type(instance)) else self,  # pyright: ignore[reportUnknownArgumentType]
                instance.is_async,
            )
            if not callable(func):  # a coroutine object is not callable either
                problem = self._invalid(state, func)
            else:
                for listener in listeners.on_create:
                    try:
                        listener.task_created(state)
                    except Exception as exc:
                        internal_error(exc)
                if self._link_mode:
                    _leave_trail(trace.get_current_span(state.context), state.names.function_name)
                if not self._spans_recorded and not self._explicit_provider:
                    self._follow_queuing_app(state.context)
        except Exception as exc:
            internal_error(exc)
        if problem is not None and self._options.strict:
            raise TypeError(problem)

    def _invalid(self, state: TaskState, func: object) -> str | None:
        """A task that can never run: say so now, in the log and on the creating span."""
        problem = invalid_task_problem(func)
        if problem is None:
            return None
        # Not closed now: the app may still hold it (``c = send(); add_task(c); await c``). When the task runs,
        # is skipped or is freed, it is closed if nothing else holds it (close_if_unheld). Not settled: left
        # unrun after a failure, it is skipped like any other task.
        if inspect.iscoroutine(func):
            state.coroutine = weakref.ref(func)
        state.problem = problem
        if self._options.strict:
            # Refused (init_task raises): the app gets no task; the TypeError is its whole story, not an outcome.
            state.settled = True
        else:
            _logger.error("%s (at %s)", problem, state.site)
        for listener in listeners.active:
            with _guard:
                listener.task_invalid(state, problem)
        creator = trace.get_current_span(state.context)
        if creator.is_recording():
            creator.add_event(semconv.EVENT_INVALID, {semconv.PROBLEM: problem})
        return problem

    def task_dropped(self, state: TaskState) -> None:
        """A task this instrumentation saw made was freed without running (the weak reference's callback).

        Counted ``dropped`` whatever it was given: a task that could never run (``add_task(coroutine)``)
        and was never attached has that one outcome too. Its mistake was reported at the ``add_task``
        call, to the log and the listeners: it is not reported a second time.
        """
        if self.retired:
            return
        execution = semconv.EXECUTION_ASYNC if state.is_async else semconv.EXECUTION_THREADPOOL
        self._metrics.count(state.names.function_name, execution, semconv.OUTCOME_DROPPED)
        if state.problem is not None:
            return
        report_dropped(state.names.function_name, state.site)
        for listener in listeners.active:
            with _guard:
                listener.task_dropped(state)

    def settle(self) -> None:
        """Tell the tasks that lie unreachable in reference cycles, before this instrumentation retires.

        A task that holds its own ``BackgroundTasks`` (``add_task(job, tasks=tasks)``) is freed, and known
        dropped, only when Python's cyclic garbage collector runs, which may be much later. Once retired,
        a task freed unrun is not counted (it may have run unseen, through Starlette's own code): so if a
        task this instrumentation saw made is still untold, collect garbage now. Nothing to collect, no
        collection.
        """
        try:
            untold = any(state.on_drop is self and not state.settled for state in list(states.values()))
        except RuntimeError:  # the dictionary changed while copied (another thread, a weak reference's callback)
            untold = True
        if untold:
            gc.collect()

    # -- execution --------------------------------------------------------------------------------

    def claim_call(self, installed: object) -> None:
        """Note our ``BackgroundTask.__call__`` wrapper, just installed, and whether it wraps Starlette's own.

        Then, for a plain ``BackgroundTask``, running Starlette's two lines ourselves is the same as calling
        through the wrapper, one coroutine and one wrapper layer shorter: :meth:`call_tasks` does so while
        the wrapper is still the one in place.
        """
        self._installed_call = installed
        inner = getattr(installed, "__wrapped__", None)
        # Starlette's function itself, or contrib's bare-span function right over it (the bypass): another
        # library's wrapt proxy would answer to their names too, and must run (a wrapper between contrib's
        # patch and ours is one the app installed).
        self._wraps_starlette = type(inner) is types.FunctionType and (
            (inner.__globals__ is _background.__dict__ and inner.__qualname__ == "BackgroundTask.__call__")
            or (self.bypass_call is not None and inner.__module__ == CONTRIB_FASTAPI)
        )

    def _runs_directly(self) -> bool:
        """Whether :meth:`_run` may run a plain ``BackgroundTask`` itself (nobody patched ``__call__`` over us)."""
        return self._wraps_starlette and vars(_BackgroundTask).get("__call__") is self._installed_call

    def call_task(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTask.__call__``: a coroutine that runs the task inside its span.

        A plain function that returns a coroutine, as calling Starlette's ``async def`` does: arguments it
        refuses raise its ``TypeError`` at the call, and what comes back is a real coroutine, which
        ``asyncio.create_task()`` takes on every Python (a generator-based one it refuses from 3.12).
        """
        if args or kwargs:  # Starlette's __call__ takes none: let it refuse them as uninstrumented
            return wrapped(*args, **kwargs)
        return self._call_task(wrapped, instance)

    async def _call_task(self, wrapped: _Wrapped, instance: Any) -> Any:
        try:
            state = state_of(instance)
        except Exception as exc:
            internal_error(exc)
            return await wrapped()
        if self._wraps_starlette:
            return await self._run(instance, state, None)
        return await self._run(instance, state, wrapped)

    @types.coroutine
    def _run(self, task: Any, state: TaskState, call: Callable[[], Awaitable[Any]] | None) -> Generator[Any, Any, Any]:
        """Run one task in its span, from start to end, in one frame: the hot path.

        A generator-based coroutine, so that it can also time each step of an ``async def`` task (the
        longest is how long the task held the event loop) without a layer of its own. ``call`` runs the
        task where something else wraps Starlette's ``__call__`` inside ours; ``None``: Starlette's two
        lines run here, and a sync task's trip through the thread pool is timed by :func:`_timed_hand_off`.
        """
        response_complete()  # Starlette runs a request's tasks after its response: its metrics end here
        start_ns = time_ns()
        options = self._options
        is_async: bool = task.is_async
        execution = semconv.EXECUTION_ASYNC if is_async else semconv.EXECUTION_THREADPOOL
        queue_duration = None if state.enqueued_ns is None else (start_ns - state.enqueued_ns) / 1e9
        state.settled = state.ran = True
        if state.coroutine is not None:  # add_task(coroutine), about to fail as Starlette runs it
            _close_unheld(state)
        span = parent = None
        try:
            if setup_checks.pending:
                check_first_task(state.context, state.names.function_name)
            parent = trace.get_current_span(state.context)
            span = self._open_span(state, parent, execution, start_ns, queue_duration)
        except Exception as exc:
            internal_error(exc)
        if span is None:  # no span, nothing to end: the task runs as if uninstrumented
            unseen: Generator[Any, Any, Any] = _awaitable(task, call, None).__await__()
            returned = yield from unseen
            return None if call is None else returned  # as Starlette's __call__: nothing
        # From here on the span exists: whatever fails, it is ended. The task's context first, so that
        # nothing below can leave the task running outside its span.
        token = timings = timeout = None
        context = state.context
        try:
            if span is not parent:  # else the span is upstream's non-recording one, current there already
                context = trace.set_span_in_context(span, context)
            if not is_async:
                timings = ThreadTimings()
                if call is not None:  # the hand-off happens beyond our reach: run_in_threadpool() finds them here
                    context = otel_context.set_value(_TIMINGS_KEY, timings, context)
            token = otel_context.attach(context)
        except Exception as exc:
            internal_error(exc)
        try:
            names = state.names
            timeout = names.timeout if names.timeout_declared else options.timeout
            self._started(task, state, span, execution, queue_duration)
        except Exception as exc:
            internal_error(exc)
        # Each step of an async def task (one send() into it) runs without yielding: the longest step is
        # the longest the task held the event loop. Timing it costs a clock read per await.
        timed = is_async and options.blocking_threshold is not None
        longest = 0.0
        result: Any = None
        scopes: list[anyio.CancelScope] = []
        try:
            if call is None and is_async:
                awaitable = task.func(*task.args, **task.kwargs)
            else:
                awaitable = _awaitable(task, call, timings)
            steps: Generator[Any, Any, Any] = _steps(awaitable)
            if timeout is not None and is_async:
                # A generator to drive, whatever types.coroutine tells the type checker.
                steps = _within(timeout, steps, scopes)  # pyright: ignore[reportAssignmentType]
            if not timed:
                result = yield from steps
            else:  # what ``yield from steps`` does, timed
                value: Any = None
                error: BaseException | None = None
                while True:
                    started = perf_counter()
                    try:
                        yielded = steps.send(value) if error is None else steps.throw(error)
                    except StopIteration as stop:
                        held = perf_counter() - started
                        longest = held if held > longest else longest
                        result = stop.value
                        break
                    except BaseException:
                        held = perf_counter() - started
                        longest = held if held > longest else longest
                        raise
                    held = perf_counter() - started
                    longest = held if held > longest else longest
                    try:
                        value, error = (yield yielded), None
                    except GeneratorExit:
                        steps.close()
                        raise
                    except BaseException as exc:  # cancellation and throw() go into the task, as with await
                        value, error = None, exc
        except BaseException as exc:
            if token is not None and _closed(exc, is_async) and not _attached_here(context):
                # Closed from outside the task's own context (its loop closed, or it was freed while
                # pending): that context dies with the task; detaching from another would fail, noisily.
                token = None
            scope = scopes[0] if scopes else None
            run = self._ran(task, state, execution, span, start_ns, queue_duration, token, timeout, scope, timings)
            run.blocking_max = longest if timed else None
            self._end(run, exc)
            self._report_or_park(run, exc)
            raise
        if call is None:
            result = None  # Starlette's __call__ awaits the task and returns nothing: neither do we
        blocking_max = longest if timed else None
        if (
            timeout is None
            and not listeners.every_end
            and not _held_too_long(blocking_max, options.blocking_threshold)
            and (timings is None or timings.returned is None)
        ):
            owned = span is not parent
            self._succeeded(span, owned, token, context, start_ns, state.names, execution, blocking_max, timings)
            return result
        # Something to judge or to tell: a timeout, a blocked loop, a listener, a body that never ran.
        scope = scopes[0] if scopes else None
        run = self._ran(task, state, execution, span, start_ns, queue_duration, token, timeout, scope, timings)
        run.blocking_max = blocking_max
        never_ran = None
        if timings is not None and timings.returned is not None:  # recorded as the mistake, raised nowhere
            never_ran = DiscardedCoroutineError(discarded_problem(task.func, timings.returned))
        self._end(run, never_ran)
        self._report(run)
        return result

    def _open_span(
        self, state: TaskState, parent: Span, execution: str, start_ns: int, queue_duration: float | None
    ) -> Span:
        """The task's span; for a creator that upstream chose not to sample, its own non-recording span."""
        creating = state.context
        parent_context = parent.get_span_context()
        if not self._link_mode and parent_context.is_valid and not parent_context.trace_flags.sampled:
            # Upstream said no: carry its non-recording context rather than ask the sampler again.
            return NonRecordingSpan(parent_context) if parent.is_recording() else parent
        names = state.names
        # All the start attributes in one dict: samplers see them, and the SDK takes them in one pass.
        attributes = {**names.start_attributes[execution]}
        if state.index is not None:
            attributes[semconv.INDEX] = state.index
        if queue_duration is not None:
            attributes[semconv.QUEUE_DURATION] = queue_duration
        if self._link_mode:
            return self._start_span(names.span_name, creating, attributes, start_ns)
        try:  # _start_span()'s child-mode half, for the hot path
            return self._tracer.start_span(names.span_name, creating, SpanKind.INTERNAL, attributes, None, start_ns)
        except Exception as exc:
            internal_error(exc)
            return trace.INVALID_SPAN

    def _started(self, task: Any, state: TaskState, span: Span, execution: str, queue_duration: float | None) -> None:
        """What follows a task's start: its count, and what only some tasks and options need."""
        names = state.names
        self._metrics.started(names.function_name, execution)
        if queue_duration is not None and self._options.queue_duration_metric:
            self._metrics.queue_duration.record(queue_duration, _metric_attributes(names, execution, None, None))
        if "sqlalchemy" in sys.modules:  # cause 5, seen before it fails; nothing to look for without SQLAlchemy
            handed_over = handed_over_session(task.args, task.kwargs)
            if handed_over is not None:
                warn_handed_over_session(names.function_name, handed_over)
                span.add_event(semconv.EVENT_SESSION_HANDED_OVER, {semconv.PROBLEM: handed_over})
        if (self._link_mode or self._arguments is not None) and span.is_recording():
            if self._link_mode:
                _link_back(trace.get_current_span(state.context), span)
            if self._arguments is not None:
                args, kwargs = self._arguments.render(task.func, task.args, task.kwargs)
                span.set_attributes({semconv.ARGS: args, semconv.KWARGS: kwargs})

    def _succeeded(
        self,
        span: Span,
        owned: bool,
        token: object,
        context: Context,
        start_ns: int,
        names: FunctionNames,
        execution: str,
        longest: float | None,
        timings: ThreadTimings | None,
    ) -> None:
        """End a task that succeeded with nothing to judge or tell: :meth:`_end` for the common case, shorter.

        ``owned``: the span is the task's own, not upstream's non-recording one (nothing to annotate or end).
        ``context``: the one attached while the task ran, for the histograms' exemplars.
        ``longest``: its longest hold of the event loop, if it was timed.
        """
        end_ns = time_ns()
        wait = None if timings is None else timings.wait
        try:
            try:
                if token is not None:
                    otel_context.detach(token)  # pyright: ignore[reportArgumentType]
                if owned and span.is_recording():
                    _set_end_attributes(span, semconv.OUTCOME_SUCCESS, longest, wait)
            finally:
                if owned:
                    span.end(end_ns)
        except Exception as exc:
            internal_error(exc)
        try:
            duration = (end_ns - start_ns) / 1e9
            self._record_metrics(names, execution, semconv.OUTCOME_SUCCESS, None, duration, wait, context)
        except Exception as exc:
            internal_error(exc)

    @staticmethod
    def _ran(
        task: Any,
        state: TaskState,
        execution: str,
        span: Span,
        start_ns: int,
        queue_duration: float | None,
        token: object,
        timeout: float | None,
        scope: anyio.CancelScope | None,
        timings: ThreadTimings | None,
    ) -> TaskRun:
        """The run of a task with something to judge or tell, made from what :meth:`_run` holds."""
        run = TaskRun(task, state, execution, span, start_ns)
        run.queue_duration = queue_duration
        run.token = token
        run.timeout = timeout
        run.scope = scope
        run.timings = timings
        return run

    def _unseen_run(self, task: Any, state: TaskState, start_ns: int) -> TaskRun:
        """A run for a task we did not see start (a subclass's own ``__call__``), to end right away."""
        state.settled = state.ran = True
        execution = _execution(task)
        queue_duration = None if state.enqueued_ns is None else (start_ns - state.enqueued_ns) / 1e9
        span = self._open_span(state, trace.get_current_span(state.context), execution, start_ns, queue_duration)
        run = TaskRun(task, state, execution, span, start_ns)
        run.queue_duration = queue_duration
        with _guard:
            self._started(task, state, span, execution, queue_duration)
        return run

    def _start_span(self, name: str, creating: Context, attributes: dict[str, AttributeValue], start_ns: int) -> Span:
        """The task's span, or, if the tracer fails, a non-recording one: metrics and logs still follow."""
        try:
            if self._link_mode:
                return self._tracer.start_span(
                    name, Context(), SpanKind.INTERNAL, attributes, _link_to(creating), start_ns
                )
            return self._tracer.start_span(name, creating, SpanKind.INTERNAL, attributes, None, start_ns)
        except Exception as exc:
            internal_error(exc)
            return trace.INVALID_SPAN

    def _end(self, run: TaskRun, exc: BaseException | None) -> None:
        # Independent guards: a broken meter must not keep the span open, nor silence the failure.
        end_ns = run.end_ns = time_ns()
        duration = (end_ns - run.start_ns) / 1e9
        run.outcome, run.error = semconv.OUTCOME_ERROR, exc
        with _guard:
            try:
                if run.token is not None:
                    otel_context.detach(run.token)  # pyright: ignore[reportArgumentType]
                    run.token = None
                run.outcome, run.error = self._classify(run, exc, duration)
                if run.error is not None:  # causes 1, 2 and 5: a known mistake behind the error
                    run.diagnosis = _diagnosis(run.state, run.error)
                if run.span.is_recording():
                    self._annotate(run, end_ns)
            finally:
                run.span.end(end_ns)
        with _guard:
            error_name = None if run.error is None else error_type(run.error)
            wait = run.threadpool_wait
            self._record_metrics(run.names, run.execution, run.outcome, error_name, duration, wait, _task_context(run))
            if run.blocking_max is not None:
                self._warn_if_blocking(run)

    def _report_or_park(self, run: TaskRun, exc: BaseException) -> None:
        """A task that raised out of a ``BackgroundTasks`` is reported by call_tasks, with the tasks it left unrun."""
        closed = _closed(exc, run.execution is semconv.EXECUTION_ASYNC)
        if run.state.index is not None and not self._options.continue_on_error and not closed:
            run.state.pending_report = run
        else:
            self._report(run)

    def _report(self, run: TaskRun) -> None:
        """Tell the listeners first (Sentry marks the exception as its own), then log a failure."""
        for listener in listeners.active:
            with _guard:
                listener.task_ended(run)
        if run.error is not None:
            with _guard:
                _log_failure(run, run.error)
            run.error = None  # its traceback holds frames that hold the run: break the cycle now

    def _record_metrics(
        self,
        names: FunctionNames,
        execution: str,
        outcome: str,
        error_name: str | None,
        duration: float,
        wait: float | None,
        context: Context,
    ) -> None:
        """The end of a run in the counts and histograms: every run's, whichever way it ended.

        ``context`` has the task's span current: exemplars name the task span (and there are none when the
        task was not sampled), although the task's context is no longer attached.
        """
        task_metrics = self._metrics
        task_metrics.ended(names.function_name, execution, outcome)
        task_metrics.record_duration(duration, _metric_attributes(names, execution, outcome, error_name), context)
        if wait is not None:
            task_metrics.record_wait(wait, _metric_attributes(names, execution, None, None), context)

    def _classify(self, run: TaskRun, exc: BaseException | None, duration: float) -> tuple[str, BaseException | None]:
        """The outcome, and the error to report (``None`` for success and cancellation)."""
        if exc is None:
            if run.timeout is None:
                return semconv.OUTCOME_SUCCESS, None
            # A sync task's time is its time on the worker thread: waiting for one is not running.
            ran = run.thread_seconds if run.execution is semconv.EXECUTION_THREADPOOL else duration
            if ran is not None and ran > run.timeout:
                why = (
                    "a sync task cannot be cancelled"
                    if run.execution is semconv.EXECUTION_THREADPOOL
                    else "it did not yield to the event loop, so it could not be cancelled"
                )
                message = f"ran {ran:.3f} s, over its {run.timeout:g} s timeout ({why})"
                return semconv.OUTCOME_TIMEOUT, TimeoutError(message)
            return semconv.OUTCOME_SUCCESS, None
        if run.scope is not None and run.scope.cancel_called and isinstance(exc, TimeoutError):
            return semconv.OUTCOME_TIMEOUT, exc
        if _cancellation(exc) or (run.execution is semconv.EXECUTION_THREADPOOL and _wait_stopped(exc) is not None):
            return semconv.OUTCOME_CANCELLED, None
        return semconv.OUTCOME_ERROR, exc

    def _annotate(self, run: TaskRun, end_ns: int) -> None:
        """End attributes and events, stamped no later than the span's end."""
        span = run.span
        _set_end_attributes(span, run.outcome, run.blocking_max, run.threadpool_wait)
        if self._blocked(run):
            span.add_event(semconv.EVENT_LOOP_BLOCKED, {semconv.BLOCKING_MAX: run.blocking_max}, end_ns)
        if run.timeout is not None:
            span.set_attribute(semconv.TIMEOUT, run.timeout)
        error = run.error
        if error is not None:
            span.set_attribute(semconv.ERROR_TYPE, error_type(error))
            message = safe_str(error)
            _record_exception(span, error, message, end_ns)
            span.set_status(Status(StatusCode.ERROR, message or type(error).__qualname__))
            if run.diagnosis is not None:
                span.set_attribute(semconv.DIAGNOSIS, run.diagnosis.value)

    def _blocked(self, run: TaskRun) -> bool:
        """Whether the task held the event loop for ``blocking_threshold`` or more."""
        return _held_too_long(run.blocking_max, self._options.blocking_threshold)

    def _warn_if_blocking(self, run: TaskRun) -> None:
        if not self._blocked(run):
            return
        name = run.names.function_name
        self._metrics.blocked(name, run.execution)
        for listener in listeners.active:
            with _guard:
                listener.task_blocked(run)
        if name in self._warned_blocking:  # once per function: the span event shows every occurrence
            return
        if len(self._warned_blocking) < 4096:
            self._warned_blocking.add(name)
        token = otel_context.attach(_task_context(run))  # the record is the task's, as the failure's is
        try:
            _logger.warning(BLOCKING, name, run.blocking_max)
        finally:
            otel_context.detach(token)

    # -- the thread-pool hand-off of sync tasks ----------------------------------------------------

    @staticmethod
    def run_in_threadpool(wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``starlette.background.run_in_threadpool``, reached when something else wraps Starlette's ``__call__``.

        Otherwise :meth:`_run` hands sync tasks to the thread pool itself and nothing is found here. A
        plain function, as the wrapped ``async def`` is to its caller: arguments it refuses raise at the call.
        """
        timings: ThreadTimings | None = None
        if args:
            try:
                timings = otel_context.get_value(_TIMINGS_KEY)  # pyright: ignore[reportAssignmentType]
            except Exception as exc:
                internal_error(exc)
        if timings is None:
            return wrapped(*args, **kwargs)
        return _timed_hand_off(wrapped, timings, args[0], args[1:], kwargs)

    # -- BackgroundTasks: index, skipped tasks, continue_on_error ----------------------------------

    def call_tasks(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTasks.__call__``: a coroutine, as :meth:`call_task`; arguments it refuses raise at the call."""
        if args or kwargs:
            return wrapped(*args, **kwargs)
        return self._call_tasks(instance)

    async def _call_tasks(self, instance: Any) -> Any:
        """Starlette's ``for task in self.tasks: await task()``, run here.

        Iterating the live list as Starlette does lets a task add a follow-up task to its own
        ``BackgroundTasks``; each task is numbered as it comes. After a failure or a cancellation, the
        tasks left unrun get ``skipped`` spans.
        """
        tasks: list[Any] = instance.tasks
        continue_on_error = self._options.continue_on_error
        direct = False
        try:
            direct = self._runs_directly()
        except Exception as exc:
            internal_error(exc)
        position, started_ns = 0, 0
        try:
            for position, task in enumerate(tasks):
                state = None
                try:
                    state = _number(task, position)
                except Exception as exc:
                    internal_error(exc)
                # A plain BackgroundTask runs here, as Starlette's __call__ would run it; others through theirs.
                if state is not None and direct and type(task) is _BackgroundTask:
                    awaitable = self._run(task, state, None)
                else:
                    started_ns = time_ns()  # for a subclass that fails without reaching our __call__ wrapper
                    awaitable = task()
                if not continue_on_error:
                    await awaitable
                    continue
                try:
                    await awaitable
                except Exception as exc:  # cancellation, a BaseException, still stops the loop
                    with _guard:
                        run = self._report_unseen_failure(task, exc, started_ns)
                        if run is not None:
                            self._report(run)
        except BaseException as exc:
            with _guard:
                self._after_failure(tasks, position, started_ns, exc)
            raise

    def _after_failure(self, tasks: list[Any], position: int, started_ns: int, exc: BaseException) -> None:
        """Show the tasks ``exc`` left unrun, then report the failed task with them."""
        failed = tasks[position] if position < len(tasks) else None
        is_async = _execution(failed) is semconv.EXECUTION_ASYNC
        stopped = exc if is_async else _wait_stopped(exc)
        cancelled = stopped is not None and _cancellation(stopped)
        # Its coroutine closed (its event loop closed, or it was freed while pending): the tasks freed with it
        # were told dropped as they went, and have no state any more; those still here are skipped.
        closed = isinstance(stopped, GeneratorExit)
        unrun = tasks[position + 1 :]
        if not closed:
            for index, task in enumerate(unrun, position + 1):  # numbered as if they had run
                _number(task, index)
        skipped = self._record_skipped(unrun, cancelled, closed)
        try:
            state = known_state(failed) if _is_task(failed) else None
            if state is None:
                return
            run, state.pending_report = state.pending_report, None
            if run is None and not cancelled:
                run = self._report_unseen_failure(failed, exc, started_ns)
            if run is not None:
                run.skipped = skipped
                self._report(run)
        finally:
            _warn_skipped(skipped, cancelled)  # after the failure's own report: cause, then effect

    def _report_unseen_failure(self, task: Any, exc: BaseException, started_ns: int) -> TaskRun | None:
        """A ``BackgroundTask`` subclass whose own ``__call__`` raised without reaching ours: record it.

        Returns the ended run, to report; ``None`` if ours did run (it has reported already).
        """
        if _is_task(task):
            state = state_of(task)
            if state.ran:
                return None
        else:  # something else in the list, awaited as ``await task()`` by Starlette's loop
            state = _passing_state(task)
        run = self._unseen_run(task, state, started_ns)
        self._end(run, exc)
        return run

    def _record_skipped(self, tasks: Iterable[Any], cancelled: bool, closed: bool = False) -> list[str]:
        skipped: list[str] = []
        now = time_ns()
        for task in _leaves(tasks):
            with _guard:
                if not _is_task(task):  # appended to the list by hand: skipped all the same
                    state = _passing_state(task)
                else:
                    state = known_state(task) if closed else state_of(task)
                    if state is None:  # freed with the closed coroutine: told dropped already
                        continue
                if state.settled:
                    continue
                state.settled = True
                if state.coroutine is not None:  # add_task(coroutine) left unrun: closed if only the task holds it
                    _close_unheld(state)
                names = state.names
                execution = _execution(task)
                attributes: dict[str, AttributeValue] = {
                    **names.attributes,
                    semconv.OUTCOME: semconv.OUTCOME_SKIPPED,
                    semconv.EXECUTION: execution,
                }
                if state.index is not None:
                    attributes[semconv.INDEX] = state.index
                self._start_span(names.span_name, state.context, attributes, now).end(now)
                self._metrics.count(names.function_name, execution, semconv.OUTCOME_SKIPPED)
                skipped.append(names.function_name)
                reason = "cancelled" if cancelled else "earlier_task_failed"
                for listener in listeners.active:
                    with _guard:
                        listener.task_skipped(state, reason)
        return skipped

    def call_fastapi_tasks(
        self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """FastAPI >= 0.163's ``BackgroundTasks.__call__``: a coroutine, as :meth:`call_task`."""
        if args or kwargs:
            return wrapped(*args, **kwargs)
        return self._call_fastapi_tasks(wrapped, instance)

    async def _call_fastapi_tasks(self, wrapped: _Wrapped, instance: Any) -> Any:
        """Run Starlette's loop instead of FastAPI's.

        FastAPI's override differs from Starlette's only by a ``fastapi.background_task`` span around
        each task. Ours replaces it (same ``code.function.name`` and ``error.type``, and more), parented
        to the creating span rather than to the request, so each task gets exactly one span. Unless
        ours would go nowhere (no SDK, or a no-op provider) while FastAPI's may have a provider of its own:
        then FastAPI's loop runs, and only the tasks a failure left unrun are ours to tell.
        """
        from starlette.background import BackgroundTasks

        if self.spans_recorded():
            return await BackgroundTasks.__call__(instance)
        tasks: list[Any] = instance.tasks
        with _guard:
            for position, task in enumerate(tasks):  # as call_tasks numbers them: the failure waits for the skipped
                _number(task, position)
        try:
            return await wrapped()
        except BaseException as exc:
            with _guard:
                # FastAPI's loop stops where Starlette's does: at the last task that started.
                started = [i for i, task in enumerate(tasks) if _ran(task)]
                self._after_failure(tasks, started[-1] if started else 0, time_ns(), exc)
            raise


def _warn_skipped(skipped: list[str], cancelled: bool) -> None:
    """One WARNING for the tasks a failure or a cancellation left unrun, logged after the failure's report."""
    if skipped and cancelled:
        _logger.warning(
            "Skipped %d background task(s) because their BackgroundTasks was cancelled before they ran "
            "(the server shutting down, or the client's connection closing): %s.",
            len(skipped),
            listing(skipped),
        )
    elif skipped:
        _logger.warning(
            "Skipped %d background task(s) because an earlier task in the same BackgroundTasks failed: %s. "
            "To run them anyway, pass continue_on_error=True to otel_bgtasks.instrument(), or set "
            "OTEL_PYTHON_BGTASKS_CONTINUE_ON_ERROR=true.",
            len(skipped),
            listing(skipped),
        )


def _tracer(tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer("otel_bgtasks.instrumentor", __version__, tracer_provider)


def _overrides_call(cls: type) -> bool:
    """Whether a ``BackgroundTask`` subclass defines its own ``__call__`` (FastAPI's tests have one)."""
    if cls is _BackgroundTask:
        return False
    known = _call_overridden.get(cls)
    if known is None:
        known = _find_own_call(cls)
        if len(_call_overridden) < 1024:
            _call_overridden[cls] = known
    return known


_call_overridden: dict[type, bool] = {}


def _find_own_call(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass.__name__ == "BackgroundTask" and klass.__module__ == "starlette.background":
            return False
        if "__call__" in vars(klass):
            return True
    return False


def _number(task: Any, index: int) -> TaskState | None:
    """``background_task.index`` of a task in its list; what is not a ``BackgroundTask`` (appended by hand) has none."""
    state = states.get(id(task))
    if state is None:
        if not _is_task(task):
            return None
        state = state_of(task)
    state.index = index
    return state


def _close_unheld(state: TaskState) -> None:
    """Close an ``add_task(coroutine)`` coroutine that only its task holds (see close_if_unheld)."""
    try:
        coroutine = None if state.coroutine is None else state.coroutine()
        if coroutine is not None:
            close_if_unheld(coroutine)
    except Exception as exc:
        internal_error(exc)


def _is_task(obj: object) -> bool:
    """A ``BackgroundTask`` with a function to run (``BackgroundTasks`` subclasses it, with a list instead)."""
    return isinstance(obj, _BackgroundTask) and not isinstance(obj, _BackgroundTasks)


def _passing_state(entry: object) -> TaskState:
    """A state for something in a task list that is not a ``BackgroundTask``: used once, kept nowhere."""
    return TaskState(None, otel_context.get_current(), None, describe(entry))


def _ran(task: object) -> bool:
    state = known_state(task) if _is_task(task) else None
    return state is not None and state.ran


def _cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` stops a task from outside: a cancellation, or its coroutine closed (GeneratorExit)."""
    if isinstance(exc, GeneratorExit):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # no event loop running any more (it closed): asyncio's is the one it can be
        return isinstance(exc, asyncio.CancelledError)


def _wait_stopped(exc: BaseException) -> BaseException | None:
    """The cancellation or ``GeneratorExit`` that stopped a sync task's wait for its thread, if one did.

    Either reaches the awaiting coroutine, never the thread, which runs on. anyio's ``to_thread.run_sync``
    may raise something else on its way out (closed outside its task or its loop, its ``CapacityLimiter``
    raises ``RuntimeError``): the stop is then in that exception's ``__context__``. The task's own exception
    comes from its thread, which no cancellation reaches.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # anyio's exits nest a few deep; a chain is finite, but need not be short
        if seen is None:
            return None
        if _cancellation(seen):
            return seen
        seen = seen.__context__
    return None


def _closed(exc: BaseException, is_async: bool) -> bool:
    """Whether the run ended because its coroutine was closed (see :func:`_wait_stopped` for a sync task)."""
    return isinstance(exc if is_async else _wait_stopped(exc), GeneratorExit)


def _awaitable(task: Any, call: Callable[[], Awaitable[Any]] | None, timings: ThreadTimings | None) -> Awaitable[Any]:
    """What awaiting the task awaits: ``call()``, or Starlette's ``BackgroundTask.__call__`` body."""
    if call is not None:
        return call()
    if task.is_async:
        return task.func(*task.args, **task.kwargs)
    run_in_threadpool: _Wrapped = vars(_background)["run_in_threadpool"]  # looked up as Starlette does: patches apply
    if timings is None:
        return run_in_threadpool(task.func, *task.args, **task.kwargs)
    return _timed_hand_off(run_in_threadpool, timings, task.func, task.args, task.kwargs)


async def _timed_hand_off(
    run_in_threadpool: _Wrapped,
    timings: ThreadTimings,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Hand a sync task to the thread pool, timing the wait for a worker and the run on it."""
    if not callable(func):  # Starlette's own TypeError ("the first argument must be callable"), where it raises it
        return await run_in_threadpool(func, *args, **kwargs)

    def on_worker(*func_args: Any, **func_kwargs: Any) -> Any:
        timings.started = perf_counter()
        try:
            returned = func(*func_args, **func_kwargs)
        finally:
            timings.finished = perf_counter()
        if returned is not None:  # an async body that Starlette is about to drop: what it is, for the outcome
            timings.returned = discarded_awaitable(returned)
        return returned

    timings.handed_off = perf_counter()
    return await run_in_threadpool(on_worker, *args, **kwargs)


def _steps(awaitable: Awaitable[Any]) -> Generator[Any, Any, Any]:
    """What ``await awaitable`` steps through: a coroutine itself, else its ``__await__()``."""
    if isinstance(awaitable, types.CoroutineType):
        # Not a Generator to the type checker; to ``yield from`` and to send/throw/close it is one.
        return awaitable  # pyright: ignore[reportUnknownVariableType, reportReturnType]
    return _await(awaitable).__await__()  # what ``await`` accepts, and raises for what it refuses, exactly


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@types.coroutine  # so that it may ``yield from`` a coroutine
def _within(
    timeout: float, steps: Generator[Any, Any, Any], scopes: list[anyio.CancelScope]
) -> Generator[Any, Any, Any]:
    """``steps`` cancelled after ``timeout`` seconds; the cancel scope goes in ``scopes``, for the outcome."""
    with anyio.fail_after(timeout) as scope:
        scopes.append(scope)
        return (yield from steps)


def _attached_here(context: Context) -> bool:
    try:
        return otel_context.get_current() is context
    except Exception:
        return False


def _held_too_long(blocking_max: float | None, threshold: float | None) -> bool:
    """Whether a timed task held the event loop for ``blocking_threshold`` or more."""
    return blocking_max is not None and threshold is not None and blocking_max >= threshold


def _set_end_attributes(span: Span, outcome: str, blocking_max: float | None, wait: float | None) -> None:
    """The end attributes every run has or may have, an error's aside."""
    # One set_attribute per value: for the usual two or three, cheaper than building a dict for set_attributes.
    span.set_attribute(semconv.OUTCOME, outcome)
    if blocking_max is not None:
        span.set_attribute(semconv.BLOCKING_MAX, blocking_max)
    if wait is not None:
        span.set_attribute(semconv.THREADPOOL_WAIT, wait)


def _metric_attributes(
    names: FunctionNames, execution: str, outcome: str | None, error_name: str | None
) -> dict[str, AttributeValue]:
    """Metric attributes, built once per function and (execution, outcome, error type)."""
    key = (execution, outcome, error_name)
    cached = names.metric_attributes.get(key)
    if cached is not None:
        return cached
    attributes = metric_attributes(names.function_name, execution, outcome, error_name)
    if len(names.metric_attributes) < 64:  # error types are many only for a task that fails in many ways
        names.metric_attributes[key] = attributes
    return attributes


def _diagnosis(state: TaskState, error: BaseException) -> Diagnosis | None:
    if state.problem is not None:
        return misuse(state.problem)
    if type(error) is DiscardedCoroutineError:
        return misuse(str(error))
    return diagnose(error)


def _execution(task: Any) -> str:
    # Something other than a BackgroundTask in the list is awaited on the event loop: ``await task()``.
    return semconv.EXECUTION_THREADPOOL if getattr(task, "is_async", True) is False else semconv.EXECUTION_ASYNC


def _leave_trail(creator: Span, function_name: str) -> None:
    """In link mode the task's span is in another trace: leave a trail in this one.

    (In child mode the task span's parent and queue delay already say who queued it and when.)
    """
    if creator.is_recording():
        creator.add_event(semconv.EVENT_ENQUEUED, {semconv.CODE_FUNCTION_NAME: function_name})


def _link_to(creating: Context) -> list[Link] | None:
    creator = trace.get_current_span(creating).get_span_context()
    return [Link(creator)] if creator.is_valid else None


def _link_back(creator: Span, task_span: Span) -> None:
    """Point from the creating span to the task's new trace, if it is still open to take a link.

    Request spans have usually ended by then (Starlette sends the response first, and both FastAPI
    and the ASGI middleware end the span with the last body chunk): the request's trace keeps the
    ``background_task.enqueued`` event made at creation instead.
    """
    if creator.is_recording():
        creator.add_link(task_span.get_span_context())


def _record_exception(span: Span, error: BaseException, message: str, timestamp: int) -> None:
    """The ``exception`` event, stamped at the span's end; by hand where the SDK's own ``str()`` would raise."""
    try:
        span.record_exception(error, timestamp=timestamp, escaped=True)
    except Exception:
        span.add_event(
            "exception",
            {
                "exception.type": error_type(error),
                "exception.message": message,
                "exception.stacktrace": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
                "exception.escaped": "True",
            },
            timestamp,
        )


# Bounds of the exception's message in the ERROR line: the whole message is on the span and in the traceback.
_MESSAGE_MAX: Final = 200


def _log_failure(run: TaskRun, error: BaseException) -> None:
    """One ERROR record per failed task, so failures show up even with no tracing backend.

    Logged with the task span's context current, whenever the report comes (after the task's own context
    was detached, or once its ``BackgroundTasks`` knows which tasks it left unrun): the SDK's
    ``LoggingHandler`` gives the exported record the current span's trace and span id, and the logging
    instrumentation's record factory its ``otelTraceID``/``otelSpanID``. The record is made by hand, at
    the task's own location, and its fields are set here too: logging refuses an ``extra=`` that
    overwrites a field, and would drop the whole record.
    """
    if not _logger.isEnabledFor(logging.ERROR):
        return
    span_context = run.span.get_span_context()
    diagnosis = run.diagnosis
    path, line, function = _failure_site(run, error)
    # A span that is no trace (a no-op tracer, no SDK): no all-zero ids that look like one.
    ids = (
        f"trace_id={trace.format_trace_id(span_context.trace_id)} span_id={trace.format_span_id(span_context.span_id)}"
        if span_context.is_valid
        else "no trace"
    )
    token = otel_context.attach(_task_context(run))
    try:
        record = _logger.makeRecord(
            _logger.name,
            logging.ERROR,
            path,
            line,
            "Background task %s failed (%s): %s [%s]%s",
            (
                run.names.function_name,
                run.outcome,
                # An error whose message is the hint (an async body that never ran): said once, in full.
                error_type(error) if diagnosis is not None and safe_str(error) == diagnosis.hint else _one_line(error),
                ids,
                "" if diagnosis is None else f" Hint: {diagnosis.hint}",  # the fix, in the one line people read
            ),
            (type(error), error, error.__traceback__),
            function,
        )
        if span_context.is_valid:
            record.otelTraceID = trace.format_trace_id(span_context.trace_id)
            record.otelSpanID = trace.format_span_id(span_context.span_id)
            record.otelTraceSampled = span_context.trace_flags.sampled
        record.background_task = run.names.function_name
        if diagnosis is not None:
            setattr(record, semconv.DIAGNOSIS, diagnosis.value)
        _logger.handle(record)
    finally:
        otel_context.detach(token)


def _task_context(run: TaskRun) -> Context:
    """The task's context, its span current: what was attached while it ran, made again once it has ended."""
    return trace.set_span_in_context(run.span, run.state.context)


def _one_line(error: BaseException) -> str:
    """``Type: message``, the message on one line and bounded (the traceback has all of it)."""
    message = " ".join(safe_str(error).split())
    if len(message) > _MESSAGE_MAX:
        message = message[: _MESSAGE_MAX - 1].rstrip() + "…"
    name = error_type(error)
    return f"{name}: {message}" if message else name


def _failure_site(run: TaskRun, error: BaseException) -> tuple[str, int, str]:
    """Where the ERROR record says it comes from: (path, line, function).

    The task function's line that raised, found in the traceback; else where the task function is defined
    (a timeout, raised around it); else where the task was created; else where the exception was raised.
    """
    names = run.names
    path = names.attributes.get(semconv.CODE_FILE_PATH)
    first_line = names.attributes.get(semconv.CODE_LINE_NUMBER)
    has_code = isinstance(path, str) and isinstance(first_line, int)
    deepest = None
    traceback_ = error.__traceback__
    while traceback_ is not None:
        code = traceback_.tb_frame.f_code
        if has_code and code.co_filename == path and code.co_firstlineno == first_line:
            return code.co_filename, traceback_.tb_lineno, names.qualname
        deepest = traceback_
        traceback_ = traceback_.tb_next
    if isinstance(path, str) and isinstance(first_line, int):
        return path, first_line, names.qualname
    if run.state.where is not None:
        return run.state.where[0], run.state.where[1], names.qualname
    if deepest is not None:
        code = deepest.tb_frame.f_code
        return code.co_filename, deepest.tb_lineno, code.co_name
    return "<unknown>", 0, names.qualname


def _leaves(tasks: Iterable[Any]) -> Iterator[Any]:
    """The tasks themselves, and those of any ``BackgroundTasks`` among them or run by one of them."""
    for task in tasks:
        inner = getattr(task, "tasks", None)  # a BackgroundTasks appended to the list itself
        if isinstance(inner, list):
            yield from _leaves(inner)  # pyright: ignore[reportUnknownArgumentType]
            continue
        yield task
        inner = getattr(getattr(task, "func", None), "tasks", None)  # add_task(other_background_tasks)
        if isinstance(inner, list):
            yield from _leaves(inner)  # pyright: ignore[reportUnknownArgumentType]
