"""Forward background-task failures to Sentry, one event per failure, tied to the task's trace.

Sentry has no notion of background tasks (getsentry/sentry-python#1473): a task's exception reaches
it, if at all, as an error of the request, without the task, and once more from its logging
integration. Here each failure becomes one event that names the task and carries the OpenTelemetry
trace and span ids; every other Sentry event for that very exception (the ASGI integration, the
logging integration, uvicorn's "Exception in ASGI application", Starlette's "Caught handled exception"
wrapper) is dropped, and so are otel_bgtasks' own ERROR records (the forwarded event says what they
say). An app's own, different exception raised while a task failure propagates (translated by a
middleware, a failing cleanup in an ``except``) is the app's and goes through, as uninstrumented.

sentry-sdk is optional (``pip install 'otel_bgtasks[sentry]'``, or ``pip install -e '.[sentry]'`` from a
clone of the repository) and only imported once a failure is forwarded or ``sentry=True`` is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Final, Literal

from opentelemetry import trace
from opentelemetry.trace import Span

from otel_bgtasks import listeners
from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.install import pip_install
from otel_bgtasks.listeners import TaskListener
from otel_bgtasks.mistakes import DiscardedCoroutineError
from otel_bgtasks.naming import MAX_LISTED
from otel_bgtasks.task_state import TaskRun, TaskState

MECHANISM: Final = "otel_bgtasks"
_OURS: Final = "otel_bgtasks_event"  # hint key marking the events we capture ourselves
# Starlette re-raises a failure whose exception handler ran after the response started as this, "from" it.
_STARLETTE_WRAPPER: Final = "Caught handled exception, but response already started."
_processor_added = False


def sentry_installed() -> bool:
    """Whether sentry-sdk can be imported, checked without importing it."""
    return importlib.util.find_spec("sentry_sdk") is not None


class SentryForwarder(TaskListener):
    """Sends each failed task to the Sentry client the application initialised, as one event."""

    every_end = False  # failures only

    def __init__(self, sentry: bool | Literal["auto"], arguments: ArgumentCapture | None) -> None:
        if sentry is True and not sentry_installed():
            raise ImportError(
                "otel_bgtasks was asked to forward failures to Sentry (sentry=True) but sentry-sdk is not "
                f"installed: {pip_install('sentry')}; or pass sentry='auto' or False."
            )
        self._auto = sentry == "auto"
        self._arguments = arguments
        self._add_processor()

    def _add_processor(self) -> None:
        """The duplicate filter, before a record of ours can reach Sentry; in "auto" mode, once the app imported it."""
        if not self._auto or "sentry_sdk" in sys.modules:
            _add_processor_once()

    def task_invalid(self, state: TaskState, problem: str) -> None:
        """An ``add_task`` mistake: its ERROR record is no event (the failure it leads to is forwarded)."""
        self._add_processor()  # for the records after this one: sentry_sdk was imported after instrument()

    def task_ended(self, run: TaskRun) -> None:
        """Forward ``run`` if it failed.

        In "auto" mode only an application that imported sentry_sdk (to call ``init``) uses Sentry:
        importing it ourselves on the first failure would stall the event loop for ~0.2 s for nothing.
        """
        # A body that never ran raised nothing in the app: its record is otel_bgtasks' own (span, log, metrics).
        if type(run.error) is DiscardedCoroutineError:
            return
        if run.error is not None and (not self._auto or "sentry_sdk" in sys.modules):
            self.forward(run, run.error)

    def forward(self, run: TaskRun, error: BaseException) -> None:
        """Capture one event for ``run``'s ``error``, if a Sentry client is active."""
        import sentry_sdk
        from sentry_sdk.integrations.dedupe import DedupeIntegration
        from sentry_sdk.utils import event_from_exception

        client = sentry_sdk.get_client()
        if not client.is_active():
            return
        _add_processor_once()
        # Already forwarded by the task that raised it: a BackgroundTasks run as a task of another fails with
        # its failing task's exception. One event, naming the task that failed.
        if error in forwarded:
            return
        forwarded.add(error)
        event, hint = event_from_exception(
            error, client_options=client.options, mechanism={"type": MECHANISM, "handled": False}
        )
        hint[_OURS] = True
        send_arguments = self._arguments is not None and client.should_send_default_pii()
        # Frame locals hold the task's arguments, unredacted (run_in_threadpool's *args among them):
        # arguments reach Sentry only through the redacted context below.
        _drop_frame_variables(event)
        span_context = run.span.get_span_context()
        route = (
            _route(trace.get_current_span(run.state.context))
            or _sentry_route(sentry_sdk.Scope.get_current_scope())  # module-level shortcuts: sentry-sdk >= 2.2
            or _sentry_route(sentry_sdk.Scope.get_isolation_scope())
        )
        qualname = run.names.qualname
        # Named in the event itself: Sentry's request integrations only fill in a name that is missing.
        event["transaction"] = f"BackgroundTask {qualname}"
        event["transaction_info"] = {"source": "component"}  # named after a function; kept by every version
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("background_task", qualname)
            scope.set_tag("background_task.outcome", run.outcome)
            if run.diagnosis is not None:  # causes 2 and 5: a known mistake, and its fix
                scope.set_tag("background_task.diagnosis", run.diagnosis.value)
            scope.set_tag("otel.trace_id", trace.format_trace_id(span_context.trace_id))
            scope.set_tag("otel.span_id", trace.format_span_id(span_context.span_id))
            if route is not None:
                scope.set_tag("http.route", route)
            scope.set_context("background_task", self._context(run, send_arguments))
            for name in run.skipped[:MAX_LISTED]:
                scope.add_breadcrumb(
                    category="background_task",
                    message=f"Skipped {name}: an earlier task in the same BackgroundTasks failed",
                    level="warning",
                    data={"code.function.name": name, "background_task.outcome": "skipped"},
                )
            if len(run.skipped) > MAX_LISTED:
                more = len(run.skipped) - MAX_LISTED
                scope.add_breadcrumb(
                    category="background_task",
                    message=f"Skipped {more} more: an earlier task in the same BackgroundTasks failed",
                    level="warning",
                    data={"background_task.outcome": "skipped", "count": more},
                )
            _forget_last_seen(client, DedupeIntegration)  # our log record may have been "seen" first
            scope.capture_event(event, hint)

    def _context(self, run: TaskRun, send_arguments: bool) -> dict[str, Any]:
        context: dict[str, Any] = {
            "function": run.names.function_name,
            "execution": run.execution,
            "outcome": run.outcome,
            "queue_delay": run.queue_duration,
        }
        if run.state.index is not None:
            context["index"] = run.state.index
        if run.diagnosis is not None:
            context["diagnosis"], context["hint"] = run.diagnosis.value, run.diagnosis.hint
        if send_arguments and self._arguments is not None:
            task = run.task
            context["args"], context["kwargs"] = self._arguments.render(task.func, task.args, task.kwargs)
        return context


class ForwardedExceptions:
    """The exceptions already sent to Sentry, kept outside them and never kept alive.

    Any other Sentry event about one of them (the ASGI integration's as it propagates, a server's log
    record) is a duplicate. Nothing is set on the exception: the app, its middleware and its server see
    it as uninstrumented. An exception of a class of its own is held by a weak reference, and leaves when
    it is freed. Python's builtin exceptions (``KeyError``, ``ValueError``, ``KeyboardInterrupt``...) cannot
    be weakly referenced (3.10-3.13), and neither can tracebacks or frames: one is known by its id and by
    the traceback it had when forwarded, which it keeps for as long as it lives (propagation only adds
    entries on the outside). That path runs through otel_bgtasks' own frames, so a new exception at a
    freed one's address that matches it can only be another task failure run by otel_bgtasks, itself
    forwarded. The last :data:`_MAX_BUILTIN` are remembered.
    """

    _MAX_BUILTIN: Final = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._weak: dict[int, weakref.ref[BaseException]] = {}
        self._builtin: OrderedDict[int, tuple[type[BaseException], _Path]] = OrderedDict()

    def add(self, error: BaseException) -> None:
        """Remember ``error`` as forwarded."""
        key = id(error)
        try:
            ref = weakref.ref(error, partial(self._forget, key))
        except TypeError:
            path = _path(error.__traceback__)
            if not path:  # never raised (a timeout judged after the fact): nothing will propagate it
                return
            with self._lock:
                self._builtin[key] = (type(error), path)
                self._builtin.move_to_end(key)
                while len(self._builtin) > self._MAX_BUILTIN:
                    self._builtin.popitem(last=False)
            return
        with self._lock:
            self._weak[key] = ref

    def __contains__(self, error: object) -> bool:
        if not isinstance(error, BaseException):
            return False
        key = id(error)
        ref = self._weak.get(key)
        if ref is not None:
            return ref() is error
        seen = self._builtin.get(key)
        if seen is None or seen[0] is not type(error):
            return False
        path = _path(error.__traceback__)
        return path[len(path) - len(seen[1]) :] == seen[1]

    def _forget(self, key: int, ref: weakref.ref[BaseException]) -> None:
        # Called by the garbage collector in any thread; the id may hold a newer exception's entry by now.
        with self._lock:
            if self._weak.get(key) is ref:
                del self._weak[key]

    def __len__(self) -> int:
        return len(self._weak) + len(self._builtin)


_Path = tuple[tuple[int, int, int], ...]


def _path(tb: TracebackType | None) -> _Path:
    """Each traceback entry, outermost first: its id, its frame's code's id, and its bytecode offset."""
    path: list[tuple[int, int, int]] = []
    while tb is not None:
        path.append((id(tb), id(tb.tb_frame.f_code), tb.tb_lasti))
        tb = tb.tb_next
    return tuple(path)


forwarded = ForwardedExceptions()


def _forget_last_seen(client: Any, dedupe: Any) -> None:
    """Let Sentry's DedupeIntegration take our event although it saw the exception in a dropped one."""
    reset = getattr(dedupe, "reset_last_seen", None)
    if reset is not None:
        reset()
        return
    integration = client.get_integration(dedupe)  # sentry-sdk < 2.x without reset_last_seen()
    if integration is not None:
        integration._last_seen.set(None)


def _route(creating_span: Span) -> str | None:
    """The creating span's ``http.route``: SDK spans expose their attributes, API spans do not."""
    attributes: Mapping[str, object] = getattr(creating_span, "attributes", None) or {}
    route = attributes.get("http.route")
    return route if isinstance(route, str) else None


def _sentry_route(isolation_scope: Any) -> str | None:
    """The request's transaction name, which Sentry's Starlette/FastAPI integrations set to the route.

    Sentry offers no public getter; read defensively, as it is only a nicety.
    """
    name = getattr(isolation_scope, "_transaction", None)
    return name if isinstance(name, str) and name.startswith("/") else None


def _drop_frame_variables(event: Mapping[str, Any]) -> None:
    values: Sequence[dict[str, Any]] = event.get("exception", {}).get("values", ())
    for value in values:
        for frame in value.get("stacktrace", {}).get("frames", ()):
            frame.pop("vars", None)


def _is_duplicate(event: dict[str, Any], hint: dict[str, Any]) -> bool:
    """Whether ``event`` tells of a failure already forwarded, and of nothing else."""
    if hint.get(_OURS):
        return False
    record = hint.get("log_record")
    if isinstance(record, logging.LogRecord) and _our_report(record):
        return True
    exc_info = hint.get("exc_info")
    error: BaseException | None = exc_info[1] if exc_info else None
    if error is None:
        return False
    if error in forwarded:
        return True
    # Any other exception whose chain holds ours is the app's own (a middleware translating it, a failing
    # cleanup): it is reported. Only Starlette's own wrapper of ours is about nothing else.
    if not _starlette_wrapper_of_forwarded(error):
        return False
    # Known by itself from now on: on its way out its links to ours may go. sentry-sdk's ASGI middleware
    # captures it (here, first) and re-raises it ``from None``; anyio 3's task groups (BaseHTTPMiddleware's
    # on Starlette 0.27) clear ``__context__``. A server's log record of it may come with neither.
    forwarded.add(error)
    return True


def _starlette_wrapper_of_forwarded(error: BaseException) -> bool:
    """Whether ``error`` is Starlette's "Caught handled exception" raised from a forwarded exception.

    Starlette raises it ``from`` the exception a handler was found for. sentry-sdk's ASGI middleware
    (2.0 and later) re-raises what it captured ``from None``, which erases that cause but not the context
    the ``raise`` inside Starlette's ``except`` set. Known by its type, message and raise site, so the
    app's own error (even with that message) chained to ours is reported, as uninstrumented.
    """
    if type(error) is not RuntimeError or error.args != (_STARLETTE_WRAPPER,) or not _raised_by_starlette(error):
        return False
    wrapped = error.__cause__ if error.__cause__ is not None else error.__context__
    return wrapped in forwarded


def _raised_by_starlette(error: BaseException) -> bool:
    """Whether ``error`` was raised in Starlette's code: its traceback's innermost frame (propagation adds outside)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__")
    return isinstance(module, str) and module.split(".", 1)[0] == "starlette"


def _our_report(record: logging.LogRecord) -> bool:
    """otel_bgtasks' own ERROR record about a task (its failure, an ``add_task`` mistake), while failures are forwarded.

    Each failure is forwarded as one event that carries what the record says (and the hint); a mistake
    that never runs fails nothing, as uninstrumented. otel_bgtasks' internal errors still reach Sentry.
    """
    return (
        record.name == "otel_bgtasks"
        and record.funcName != "internal_error"
        and any(isinstance(listener, SentryForwarder) for listener in listeners.active)
    )


def _add_processor_once() -> None:
    global _processor_added
    if _processor_added:
        return
    from sentry_sdk.scope import add_global_event_processor

    def drop_duplicates(event: Any, hint: Any) -> Any:
        try:
            return None if _is_duplicate(event, hint or {}) else event
        except Exception:
            return event

    add_global_event_processor(drop_duplicates)
    _processor_added = True
