"""The wrappers around Starlette's ``BackgroundTask`` and ``BackgroundTasks``: the hot path.

Every background task runs through :meth:`TaskWrappers.init_task` (when it is created, in the
request) and :meth:`TaskWrappers.call_task` (when it runs, after the response). The task's own
call, return value and exception pass through untouched; all the tracing work around it is guarded
so that a failure here leaves the task running as if uninstrumented.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from time import time_ns
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from otel_bgtasks import semconv
from otel_bgtasks.config import Options
from otel_bgtasks.guard import internal_error
from otel_bgtasks.naming import describe, error_type

STATE_ATTRIBUTE = "_otel_bgtasks_state"

_Wrapped = Callable[..., Awaitable[Any]]


class TaskState:
    """What a task carries from its creation to its run."""

    __slots__ = ("context", "enqueued_ns", "index", "started")

    def __init__(self, context: Context, enqueued_ns: int | None) -> None:
        self.context = context
        self.enqueued_ns = enqueued_ns
        self.index: int | None = None
        self.started = False


def state_of(task: Any) -> TaskState:
    """The task's state; a task created before ``instrument()`` gets one on first sight."""
    state: TaskState | None = getattr(task, STATE_ATTRIBUTE, None)
    if state is None:
        state = TaskState(otel_context.get_current(), None)
        setattr(task, STATE_ATTRIBUTE, state)
    return state


class TaskWrappers:
    """The wrapt wrappers, bound to one tracer and one set of options."""

    def __init__(self, tracer: trace.Tracer, options: Options, bypass_call: _Wrapped | None = None) -> None:
        self._tracer = tracer
        self._link_mode = options.mode == "link"
        # opentelemetry-instrumentation-fastapi, when it patched BackgroundTask.__call__ before us, would
        # open a second, bare span inside ours: call the original it wraps instead (see instrumentor.py).
        self._bypass_call = bypass_call

    # -- creation ---------------------------------------------------------------------------------

    def init_task(
        self, wrapped: Callable[..., None], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """``BackgroundTask.__init__``: remember the creating context, and say so on the creating span."""
        wrapped(*args, **kwargs)
        try:
            current = otel_context.get_current()
            setattr(instance, STATE_ATTRIBUTE, TaskState(current, time_ns()))
            creator = trace.get_current_span(current)
            if creator.is_recording():
                names = describe(instance.func)
                creator.add_event(semconv.EVENT_ENQUEUED, {semconv.CODE_FUNCTION_NAME: names.function_name})
        except Exception as exc:
            internal_error(exc)

    # -- execution --------------------------------------------------------------------------------

    async def call_task(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTask.__call__``: run the task inside its span."""
        call = wrapped if self._bypass_call is None else partial(self._bypass_call, instance)
        try:
            span, token = self._start(instance)
        except Exception as exc:
            internal_error(exc)
            return await call(*args, **kwargs)
        try:
            result = await call(*args, **kwargs)
        except BaseException as exc:
            self._end(span, token, exc)
            raise
        self._end(span, token, None)
        return result

    def _start(self, task: Any) -> tuple[Span, object]:
        state = state_of(task)
        state.started = True
        names = describe(task.func)
        start_ns = time_ns()
        creating = state.context
        if self._link_mode:
            creator = trace.get_current_span(creating)
            creator_context = creator.get_span_context()
            links = [Link(creator_context)] if creator_context.is_valid else None
            span = self._tracer.start_span(
                names.span_name, Context(), SpanKind.INTERNAL, names.attributes, links, start_ns
            )
        else:
            span = self._tracer.start_span(
                names.span_name, creating, SpanKind.INTERNAL, names.attributes, None, start_ns
            )
        if span.is_recording():
            span.set_attributes(self._run_attributes(task, state, start_ns))
            if self._link_mode:
                self._link_back(trace.get_current_span(creating), span)
        token = otel_context.attach(trace.set_span_in_context(span, creating))
        return span, token

    @staticmethod
    def _run_attributes(task: Any, state: TaskState, start_ns: int) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            semconv.EXECUTION: semconv.EXECUTION_ASYNC if task.is_async else semconv.EXECUTION_THREADPOOL
        }
        if state.index is not None:
            attributes[semconv.INDEX] = state.index
        if state.enqueued_ns is not None:
            attributes[semconv.QUEUE_DURATION] = (start_ns - state.enqueued_ns) / 1e9
        return attributes

    @staticmethod
    def _link_back(creator: Span, task_span: Span) -> None:
        """Point from the creating span to the task's new trace, if it is still open to take a link.

        Request spans have usually ended by then (Starlette sends the response first, and both FastAPI
        and the ASGI middleware end the span with the last body chunk): the request's trace keeps the
        ``background_task.enqueued`` event made at creation instead.
        """
        if creator.is_recording():
            creator.add_link(task_span.get_span_context())

    @staticmethod
    def _end(span: Span, token: object, exc: BaseException | None) -> None:
        try:
            otel_context.detach(token)  # type: ignore[arg-type]
            if span.is_recording():
                if exc is None:
                    span.set_attribute(semconv.OUTCOME, semconv.OUTCOME_SUCCESS)
                elif isinstance(exc, anyio.get_cancelled_exc_class()):
                    span.set_attribute(semconv.OUTCOME, semconv.OUTCOME_CANCELLED)
                else:
                    span.set_attributes({semconv.OUTCOME: semconv.OUTCOME_ERROR, semconv.ERROR_TYPE: error_type(exc)})
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__qualname__))
            span.end()
        except Exception as internal:
            internal_error(internal)

    # -- BackgroundTasks: index and skipped tasks --------------------------------------------------

    async def call_tasks(self, wrapped: _Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``BackgroundTasks.__call__``: number the tasks; after a failure, show the ones never run."""
        tasks: list[Any] = []
        try:
            tasks = list(instance.tasks)
            for index, task in enumerate(tasks):
                state_of(task).index = index
        except Exception as exc:
            internal_error(exc)
        try:
            return await wrapped(*args, **kwargs)
        except BaseException:
            self._record_skipped(tasks)
            raise

    def _record_skipped(self, tasks: Iterable[Any]) -> None:
        try:
            now = time_ns()
            for task in _leaves(tasks):
                state = state_of(task)
                if state.started:
                    continue
                names = describe(task.func)
                attributes = {**names.attributes, semconv.OUTCOME: semconv.OUTCOME_SKIPPED}
                if state.index is not None:
                    attributes[semconv.INDEX] = state.index
                attributes[semconv.EXECUTION] = (
                    semconv.EXECUTION_ASYNC if task.is_async else semconv.EXECUTION_THREADPOOL
                )
                if self._link_mode:
                    creator_context = trace.get_current_span(state.context).get_span_context()
                    links = [Link(creator_context)] if creator_context.is_valid else None
                    span = self._tracer.start_span(
                        names.span_name, Context(), SpanKind.INTERNAL, attributes, links, now
                    )
                else:
                    span = self._tracer.start_span(
                        names.span_name, state.context, SpanKind.INTERNAL, attributes, None, now
                    )
                span.end(now)
        except Exception as exc:
            internal_error(exc)

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


def _leaves(tasks: Iterable[Any]) -> Iterator[Any]:
    """The tasks themselves, descending into a ``BackgroundTasks`` queued inside another."""
    for task in tasks:
        inner = getattr(task, "tasks", None)
        if isinstance(inner, list):
            yield from _leaves(inner)  # pyright: ignore[reportUnknownArgumentType]
        else:
            yield task
