"""The wrappers around Starlette's ``BackgroundTask`` and ``BackgroundTasks``: the hot path.

Every background task runs through :meth:`TaskWrappers.init_task` (when it is created, in the
request) and :meth:`TaskWrappers.call_task` (when it runs, after the response). The task's own
call, return value and exception pass through untouched; all the telemetry work around it is guarded
so that a failure here leaves the task running as if uninstrumented.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import suppress
from functools import partial
from time import perf_counter, time_ns
from typing import Any, Final

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from otel_bgtasks import semconv
from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.blocking import LoopHoldTimer
from otel_bgtasks.config import Options
from otel_bgtasks.diagnosis import diagnose, handed_over_session, warn_handed_over_session
from otel_bgtasks.guard import internal_error
from otel_bgtasks.metrics import TaskMetrics
from otel_bgtasks.mistakes import creation_site, discard, invalid_task_problem, report_dropped
from otel_bgtasks.naming import describe, error_type
from otel_bgtasks.sentry import SentryForwarder, TaskFailure
from otel_bgtasks.task_state import STATE_ATTRIBUTE, TaskRun, TaskState, state_of

_logger = logging.getLogger("otel_bgtasks")

# The running task, carried in the OpenTelemetry context we attach anyway, so the thread-pool hand-off
# can find it without a context variable of its own.
_RUN_KEY: Final = otel_context.create_key("otel_bgtasks.run")

_Wrapped = Callable[..., Awaitable[Any]]


class TaskWrappers:
    """The wrapt wrappers, bound to one tracer, one set of instruments and one set of options."""

    def __init__(
        self,
        tracer: trace.Tracer,
        task_metrics: TaskMetrics,
        options: Options,
        arguments: ArgumentCapture | None = None,
        sentry: SentryForwarder | None = None,
    ) -> None:
        self._tracer = tracer
        self._metrics = task_metrics
        self._options = options
        self._arguments = arguments  # None unless the user opted in with capture_args=True
        self._sentry = sentry
        self._link_mode = options.mode == "link"
        # opentelemetry-instrumentation-fastapi, when it patched BackgroundTask.__call__ before us, would
        # open a second, bare span inside ours: call the original it wraps instead (see peers.py).
        self.bypass_call: _Wrapped | None = None
        self._duration_attributes: dict[tuple[str, str, str, str | None], dict[str, AttributeValue]] = {}
        self._warned_blocking: set[str] = set()
        # Set by uninstrument(): a task created before and run after it was never seen to start.
        self.retired = False

    # -- creation ---------------------------------------------------------------------------------

    def init_task(
        self, wrapped: Callable[..., None], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """``BackgroundTask.__init__``: remember the creating context, and say so on the creating span."""
        wrapped(*args, **kwargs)
        problem = None
        try:
            problem = self._remember_creation(instance)
        except Exception as exc:
            internal_error(exc)
        if problem is not None and self._options.strict:
            raise TypeError(problem)

    def _remember_creation(self, task: Any) -> str | None:
        current = otel_context.get_current()
        func = task.func
        state = TaskState(current, time_ns(), describe(func))
        state.site = creation_site()
        state.on_drop = self._dropped
        setattr(task, STATE_ATTRIBUTE, state)
        creator = trace.get_current_span(current)
        problem = invalid_task_problem(func)
        if problem is not None:
            discard(func)
            state.done = True  # already reported, and it could never run
            if not self._options.strict:
                _logger.error("%s (at %s)", problem, state.site)
            if creator.is_recording():
                creator.add_event(semconv.EVENT_INVALID, {semconv.PROBLEM: problem})
        elif creator.is_recording():
            creator.add_event(semconv.EVENT_ENQUEUED, {semconv.CODE_FUNCTION_NAME: state.names.function_name})
        return problem

    def _dropped(self, state: TaskState) -> None:
        if self.retired:
            return
        execution = semconv.EXECUTION_THREADPOOL  # unknown for a task never run; sync is Starlette's default
        self._metrics.count(state.names.function_name, execution, semconv.OUTCOME_DROPPED)
        report_dropped(state.names.function_name, state.site)

    # -- execution --------------------------------------------------------------------------------

    async def call_task(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTask.__call__``: run the task inside its span."""
        call = wrapped if self.bypass_call is None else partial(self.bypass_call, instance)
        try:
            run = self._start(instance)
        except Exception as exc:
            internal_error(exc)
            return await call(*args, **kwargs)
        try:
            awaitable: Awaitable[Any] = call(*args, **kwargs)
            if run.execution is semconv.EXECUTION_ASYNC and self._options.blocking_threshold is not None:
                awaitable = run.timer = LoopHoldTimer(awaitable)  # type: ignore[arg-type]
            if run.timeout is not None and run.execution is semconv.EXECUTION_ASYNC:
                with anyio.fail_after(run.timeout) as run.scope:
                    result = await awaitable
            else:
                result = await awaitable
        except BaseException as exc:
            self._end(run, exc)
            raise
        self._end(run, None)
        return result

    def _start(self, task: Any) -> TaskRun:
        state = state_of(task)
        state.done = True
        names = state.names
        execution = _execution(task)
        start_ns = time_ns()
        queue_duration = None if state.enqueued_ns is None else (start_ns - state.enqueued_ns) / 1e9
        # All the start attributes in one dict: samplers see them, and the SDK takes them in one pass.
        attributes: dict[str, AttributeValue] = {**names.attributes, semconv.EXECUTION: execution}
        if state.index is not None:
            attributes[semconv.INDEX] = state.index
        if queue_duration is not None:
            attributes[semconv.QUEUE_DURATION] = queue_duration
        creating = state.context
        span = self._start_span(names.span_name, creating, attributes, start_ns)
        run = TaskRun(task, state, execution, span, start_ns)
        run.timeout = names.timeout_or(self._options.timeout)
        run.queue_duration = queue_duration
        if span.is_recording():
            if self._arguments is not None:
                args, kwargs = self._arguments.render(task.func, task.args, task.kwargs)
                span.set_attributes({semconv.ARGS: args, semconv.KWARGS: kwargs})
            if self._link_mode:
                _link_back(trace.get_current_span(creating), span)
        handed_over = handed_over_session(task.args, task.kwargs)  # cause 5, seen before it fails
        if handed_over is not None:
            warn_handed_over_session(names.function_name, handed_over)
            span.add_event(semconv.EVENT_SESSION_HANDED_OVER, {semconv.PROBLEM: handed_over})
        try:  # a broken meter must not lose the span
            self._metrics.started(run.metric_key)
            if queue_duration is not None:
                self._metrics.queue_duration.record(queue_duration, self._attributes(run, None, None))
        except Exception as exc:
            internal_error(exc)
        run.token = otel_context.attach(
            otel_context.set_value(_RUN_KEY, run, trace.set_span_in_context(span, creating))
        )
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
        # Three independent guards: a broken meter must not keep the span open, nor silence the failure.
        end_ns = time_ns()
        duration = (end_ns - run.start_ns) / 1e9
        outcome, error = semconv.OUTCOME_ERROR, exc
        try:
            otel_context.detach(run.token)  # type: ignore[arg-type]
            outcome, error = self._classify(run, exc, duration)
            if run.span.is_recording():
                self._annotate(run, run.span, outcome, error)
        except Exception as internal:
            internal_error(internal)
        finally:
            run.span.end(end_ns)
        try:
            self._record_metrics(run, outcome, error, duration)
            self._warn_if_blocking(run)
        except Exception as internal:
            internal_error(internal)
        if error is not None:
            if self._sentry is not None and self._sentry.wanted():
                try:
                    self._report_to_sentry(run, outcome, error)  # first: it tells Sentry our log record is a copy
                except Exception as internal:
                    internal_error(internal)
            try:
                _log_failure(run, outcome, error)
            except Exception as internal:
                internal_error(internal)

    def _record_metrics(self, run: TaskRun, outcome: str, error: BaseException | None, duration: float) -> None:
        task_metrics = self._metrics
        task_metrics.ended(run.metric_key)
        task_metrics.duration.record(duration, self._attributes(run, outcome, error))
        task_metrics.count(run.names.function_name, run.execution, outcome)
        if run.threadpool_wait is not None:
            task_metrics.threadpool_wait.record(run.threadpool_wait, self._attributes(run, None, None))

    def _report_to_sentry(self, run: TaskRun, outcome: str, error: BaseException) -> None:
        assert self._sentry is not None
        self._sentry.claim(error)
        task = run.task
        failure = TaskFailure(
            error=error,
            qualname=run.names.qualname,
            function_name=run.names.function_name,
            execution=run.execution,
            outcome=outcome,
            span=run.span,
            creating_span=trace.get_current_span(run.state.context),
            queue_duration=run.queue_duration,
            index=run.state.index,
            func=task.func,
            args=task.args,
            kwargs=task.kwargs,
        )
        if run.state.index is not None and not self._options.continue_on_error:
            run.state.failure = failure  # call_tasks forwards it, once it knows what was skipped
        else:
            self._sentry.forward(failure)

    def _classify(self, run: TaskRun, exc: BaseException | None, duration: float) -> tuple[str, BaseException | None]:
        """The outcome, and the error to report (``None`` for success and cancellation)."""
        if exc is None:
            if run.timeout is not None and duration > run.timeout:  # a sync task cannot be stopped
                return semconv.OUTCOME_TIMEOUT, TimeoutError(
                    f"ran {duration:.3f} s, over its {run.timeout:g} s timeout (a sync task cannot be cancelled)"
                )
            return semconv.OUTCOME_SUCCESS, None
        if run.scope is not None and run.scope.cancel_called and isinstance(exc, TimeoutError):
            return semconv.OUTCOME_TIMEOUT, exc
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return semconv.OUTCOME_CANCELLED, None
        return semconv.OUTCOME_ERROR, exc

    def _annotate(self, run: TaskRun, span: Span, outcome: str, error: BaseException | None) -> None:
        attributes: dict[str, AttributeValue] = {semconv.OUTCOME: outcome}
        if run.timer is not None:
            attributes[semconv.BLOCKING_MAX] = run.timer.longest
            if self._blocked(run):
                span.add_event(semconv.EVENT_EVENT_LOOP_BLOCKED, {semconv.BLOCKING_MAX: run.timer.longest})
        if run.threadpool_wait is not None:
            attributes[semconv.THREADPOOL_WAIT] = run.threadpool_wait
        if run.timeout is not None:
            attributes[semconv.TIMEOUT] = run.timeout
        if error is not None:
            attributes[semconv.ERROR_TYPE] = error_type(error)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__qualname__))
            diagnosis = diagnose(error)  # causes 2 and 5: a known mistake behind the error
            if diagnosis is not None:
                attributes[semconv.DIAGNOSIS] = diagnosis.value
        span.set_attributes(attributes)

    def _blocked(self, run: TaskRun) -> bool:
        """Whether the task held the event loop for ``blocking_threshold`` or more."""
        threshold = self._options.blocking_threshold
        return run.timer is not None and threshold is not None and run.timer.longest >= threshold

    def _warn_if_blocking(self, run: TaskRun) -> None:
        if not self._blocked(run):
            return
        assert run.timer is not None
        name = run.names.function_name
        if name in self._warned_blocking:  # once per function: the span event shows every occurrence
            return
        self._warned_blocking.add(name)
        _logger.warning(
            "Background task %s blocked the event loop for %.3f s without awaiting, stalling every request "
            "meanwhile. Make it a plain `def` (Starlette runs those in a thread pool) or use an async library "
            "for the blocking call.",
            name,
            run.timer.longest,
        )

    def _attributes(self, run: TaskRun, outcome: str | None, error: BaseException | None) -> dict[str, AttributeValue]:
        """Metric attributes, built once per (function, execution, outcome, error type)."""
        error_name = None if error is None else error_type(error)
        key = (run.names.function_name, run.execution, outcome or "", error_name)
        cached = self._duration_attributes.get(key)
        if cached is not None:
            return cached
        attributes: dict[str, AttributeValue] = {
            semconv.CODE_FUNCTION_NAME: run.names.function_name,
            semconv.EXECUTION: run.execution,
        }
        if outcome is not None:
            attributes[semconv.OUTCOME] = outcome
        if error_name is not None:
            attributes[semconv.ERROR_TYPE] = error_name
        if len(self._duration_attributes) < 4096:
            self._duration_attributes[key] = attributes
        return attributes

    # -- the thread-pool hand-off of sync tasks ----------------------------------------------------

    @staticmethod
    async def run_in_threadpool(wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``starlette.background.run_in_threadpool``: time the wait for a worker thread."""
        run: TaskRun | None = otel_context.get_value(_RUN_KEY)  # type: ignore[assignment]
        if run is None or not args:
            return await wrapped(*args, **kwargs)
        func = args[0]

        def on_worker(*func_args: Any, **func_kwargs: Any) -> Any:
            run.worker_started = perf_counter()
            return func(*func_args, **func_kwargs)

        run.handed_off = perf_counter()
        return await wrapped(on_worker, *args[1:], **kwargs)

    # -- BackgroundTasks: index, skipped tasks, continue_on_error ----------------------------------

    async def call_tasks(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTasks.__call__``: number the tasks; after a failure, show the ones never run."""
        tasks: list[Any] = []
        try:
            tasks = list(instance.tasks)
            for index, task in enumerate(tasks):
                state_of(task).index = index
        except Exception as exc:
            internal_error(exc)
        if self._options.continue_on_error:
            return await _run_all(tasks)
        try:
            return await wrapped(*args, **kwargs)
        except BaseException:
            skipped = self._record_skipped(tasks)
            if self._sentry is not None and self._sentry.wanted():
                self._forward_pending(tasks, skipped)
            raise

    def _forward_pending(self, tasks: list[Any], skipped: list[str]) -> None:
        assert self._sentry is not None
        try:
            for task in _leaves(tasks):
                state = state_of(task)
                if state.failure is not None:
                    failure, state.failure = state.failure, None
                    failure.skipped = skipped
                    self._sentry.forward(failure)
        except Exception as exc:
            internal_error(exc)

    def _record_skipped(self, tasks: Iterable[Any]) -> list[str]:
        skipped: list[str] = []
        try:
            now = time_ns()
            for task in _leaves(tasks):
                state = state_of(task)
                if state.done:
                    continue
                state.done = True
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
            if skipped:
                _logger.warning(
                    "Skipped %d background task(s) because an earlier task in the same BackgroundTasks failed: %s. "
                    "Pass continue_on_error=True to otel_bgtasks.instrument() to run them anyway.",
                    len(skipped),
                    ", ".join(skipped),
                )
        except Exception as exc:
            internal_error(exc)
        return skipped

    @staticmethod
    async def call_fastapi_tasks(
        wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """FastAPI >= 0.163's ``BackgroundTasks.__call__``: run Starlette's loop instead.

        FastAPI's override differs from Starlette's only by a ``fastapi.background_task`` span around
        each task. Ours replaces it (same ``code.function.name`` and ``error.type``, and more), parented
        to the creating span rather than to the request, so each task gets exactly one span.
        """
        from starlette.background import BackgroundTasks

        return await BackgroundTasks.__call__(instance, *args, **kwargs)


async def _run_all(tasks: list[Any]) -> None:
    """``continue_on_error``: run every task; each failure is already recorded and logged by its span."""
    for task in tasks:
        with suppress(Exception):  # cancellation, a BaseException, still stops the loop
            await task()


def _execution(task: Any) -> str:
    return semconv.EXECUTION_ASYNC if task.is_async else semconv.EXECUTION_THREADPOOL


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


def _log_failure(run: TaskRun, outcome: str, error: BaseException) -> None:
    """One ERROR record per failed task, so failures show up even with no tracing backend."""
    span_context = run.span.get_span_context()
    trace_id = trace.format_trace_id(span_context.trace_id)
    span_id = trace.format_span_id(span_context.span_id)
    extra = {"otelTraceID": trace_id, "otelSpanID": span_id, "background_task": run.names.function_name}
    diagnosis = diagnose(error)  # causes 2 and 5: the fix, in the one line people read
    if diagnosis is not None:
        extra[semconv.DIAGNOSIS] = diagnosis.value
    _logger.error(
        "Background task %s failed (%s): %s [trace_id=%s span_id=%s]%s",
        run.names.function_name,
        outcome,
        error_type(error),
        trace_id,
        span_id,
        "" if diagnosis is None else f" Hint: {diagnosis.hint}",
        exc_info=error,
        extra=extra,
    )


def _leaves(tasks: Iterable[Any]) -> Iterator[Any]:
    """The tasks themselves, descending into a ``BackgroundTasks`` queued inside another."""
    for task in tasks:
        inner = getattr(task, "tasks", None)
        if isinstance(inner, list):
            yield from _leaves(inner)  # pyright: ignore[reportUnknownArgumentType]
        else:
            yield task
