"""Forward background-task failures to Sentry, one event per failure, tied to the task's trace.

Sentry has no notion of background tasks (getsentry/sentry-python#1473): a task's exception reaches
it, if at all, as an error of the request, without the task, and once more from its logging
integration. Here each failure becomes one event that names the task and carries the OpenTelemetry
trace and span ids; every other Sentry event for the same exception (the ASGI integration, the
logging integration, Starlette's "Caught handled exception" wrapper) is dropped.

sentry-sdk is optional (``pip install 'otel_bgtasks[sentry]'``, or ``pip install -e '.[sentry]'`` from a
clone of the repository) and only imported once a failure is forwarded or ``sentry=True`` is asked for.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any, Final, Literal

from opentelemetry import trace
from opentelemetry.trace import Span

from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.install import pip_install
from otel_bgtasks.listeners import TaskListener
from otel_bgtasks.task_state import TaskRun

MECHANISM: Final = "otel_bgtasks"
_OURS: Final = "otel_bgtasks_event"  # hint key marking the events we capture ourselves
# Set on an exception we forwarded: any other Sentry event about it (our own log record, the ASGI
# integration's as the exception propagates) is a duplicate. Kept on the exception itself, so that it
# goes when the exception goes: nothing here holds a failed task's exception or its frames.
_FORWARDED: Final = "__otel_bgtasks_forwarded__"
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

    def task_ended(self, run: TaskRun) -> None:
        """Forward ``run`` if it failed.

        In "auto" mode only an application that imported sentry_sdk (to call ``init``) uses Sentry:
        importing it ourselves on the first failure would stall the event loop for ~0.2 s for nothing.
        """
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
        _mark_forwarded(error)  # before our own log record reaches Sentry's logging integration
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
            for name in run.skipped:
                scope.add_breadcrumb(
                    category="background_task",
                    message=f"Skipped {name}: an earlier task in the same BackgroundTasks failed",
                    level="warning",
                    data={"code.function.name": name, "background_task.outcome": "skipped"},
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


def _mark_forwarded(error: BaseException) -> None:
    with suppress(Exception):  # an exception type that refuses attributes: its duplicates go through
        setattr(error, _FORWARDED, True)


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
    if hint.get(_OURS):
        return False
    exc_info = hint.get("exc_info")
    error: BaseException | None = exc_info[1] if exc_info else None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # Starlette wraps ours: "... from exc"
        if getattr(error, _FORWARDED, False) is True:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


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
