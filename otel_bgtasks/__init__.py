"""OpenTelemetry instrumentation for FastAPI and Starlette background tasks.

Starlette runs ``BackgroundTasks`` after the response is sent, so a task that fails or crawls leaves
no trace on the request. otel_bgtasks gives every task a span, tied to the request that queued it.

Usage
-----

.. code-block:: python

    from fastapi import BackgroundTasks, FastAPI

    import otel_bgtasks

    app = FastAPI()
    otel_bgtasks.instrument(app)  # task spans, plus request spans if the app has none yet


    def send_email(address: str) -> None: ...


    @app.post("/signup")
    async def signup(address: str, tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_email, address)  # -> span "BackgroundTask send_email"
        return {"status": "ok"}

With no code change, ``opentelemetry-instrument uvicorn app:app`` loads
:class:`BackgroundTasksInstrumentor` through its entry point ``background_tasks``;
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=background_tasks`` turns it off.

API
---

- ``instrument(app=None, *, tracer_provider=None, meter_provider=None, mode=..., ...)``: patch task
  creation and execution process-wide (calling it again changes nothing) and, given an app, add
  request spans to it unless it already has them. Returns the app to serve. Its docstring lists
  every option.
- ``uninstrument()``: restore every patched attribute.
- ``mode="child"`` (default): a task's span is a child of the span current when it was queued.
  ``mode="link"``: each task starts a new trace whose root links to that span.
- ``task_options(timeout=...)``: a decorator giving one task function its own timeout.
- Options can also be set with ``OTEL_PYTHON_BGTASKS_<OPTION>`` environment variables; explicit
  arguments win.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from otel_bgtasks.config import UNSET, Unset, explicit, task_options
from otel_bgtasks.version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor

__all__ = ["UNSET", "BackgroundTasksInstrumentor", "__version__", "instrument", "task_options", "uninstrument"]

_App = TypeVar("_App")


def __getattr__(name: str) -> Any:
    """``BackgroundTasksInstrumentor`` on first use: importing the package stays cheap.

    pytest imports the package at every start of every test run where otel_bgtasks is installed (its
    ``pytest11`` plugin lives here); the instrumentor brings OpenTelemetry, wrapt and asyncio, about
    0.2 s and 300 modules, which only a process that instruments should pay for.
    """
    if name == "BackgroundTasksInstrumentor":
        from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor

        return BackgroundTasksInstrumentor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def instrument(
    app: _App = None,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    mode: Literal["child", "link"] | Unset = UNSET,
    continue_on_error: bool | Unset = UNSET,
    timeout: float | Unset | None = UNSET,
    blocking_threshold: float | Unset | None = UNSET,
    strict: bool | Unset = UNSET,
    sentry: bool | Literal["auto"] | Unset = UNSET,
    capture_args: bool | Unset = UNSET,
    capture_args_max_length: int | Unset = UNSET,
    redact_keys: Sequence[str] | Unset = UNSET,
    queue_duration_metric: bool | Unset = UNSET,
    request_metrics_end_at_response: bool | Unset = UNSET,
) -> _App:
    """Trace every background task; with ``app``, also make sure its requests are traced.

    Patches task creation and execution process-wide, once: a later call with other options logs a
    WARNING naming what it ignored (``uninstrument()`` first to change them). An option left out comes
    from ``OTEL_PYTHON_BGTASKS_<OPTION>``, else its default.

    Args:
        app: a Starlette/FastAPI app (or any ASGI app) to give request spans, unless it has them already.
        tracer_provider: where task spans go; the global provider if ``None``.
        meter_provider: where task metrics go; the global provider if ``None``.
        mode: ``"child"`` (default): a task's span is a child of the span current when it was queued.
            ``"link"``: each task starts a new trace whose root links to that span.
        continue_on_error: run the tasks after a failed one in the same ``BackgroundTasks`` (default False;
            Starlette stops at the first failure).
        timeout: seconds; an ``async def`` task over it is cancelled, a ``def`` task is reported when it ends.
            ``None`` (default): no timeout. Per function: :func:`task_options`.
        blocking_threshold: seconds an ``async def`` task may hold the event loop before it is reported as
            blocking (default 0.1); ``None`` turns the measurement off.
        strict: raise ``TypeError`` at ``add_task(coroutine_object)`` and non-callables (default False: log).
        sentry: ``"auto"`` (default): forward failures to an initialised sentry-sdk; ``True``: require it;
            ``False``: never.
        capture_args: record task arguments on spans, secrets redacted (default False: never recorded).
        capture_args_max_length: characters per rendered argument (default 256, at least 16).
        redact_keys: more names whose values are redacted, on top of the built-in list.
        queue_duration_metric: also record the queue delay as the histogram ``background_task.queue.duration``
            (default False: it is always a span attribute; the histogram costs about half a span per task).
        request_metrics_end_at_response: end the request metrics of opentelemetry-instrumentation-asgi's
            middleware (``http.server.*duration``, ``http.server.active_requests``) when the response is
            complete, not after the background tasks (default True).

    Returns:
        The app to serve: ``app`` itself for Starlette and FastAPI, else the middleware around it.

    Raises:
        ValueError: an option value that is not allowed; the message lists what is.
    """
    options = explicit(
        mode=mode,
        continue_on_error=continue_on_error,
        timeout=timeout,
        blocking_threshold=blocking_threshold,
        strict=strict,
        sentry=sentry,
        capture_args=capture_args,
        capture_args_max_length=capture_args_max_length,
        redact_keys=redact_keys,
        queue_duration_metric=queue_duration_metric,
        request_metrics_end_at_response=request_metrics_end_at_response,
    )
    from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor, instrumentor_lock
    from otel_bgtasks.request_metrics import equip
    from otel_bgtasks.request_spans import ensure_request_spans, native_tracer_provider, traced_with_an_unseen_provider
    from otel_bgtasks.setup_checks import note_unseen_provider

    instrumentor = BackgroundTasksInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    if app is None:
        return app
    with instrumentor_lock:
        instrumentor.follow(native_tracer_provider(app))  # FastAPI(telemetry={"tracer_provider": ...})
        if traced_with_an_unseen_provider(app):  # OpenTelemetryMiddleware(app, tracer_provider=...) made earlier
            note_unseen_provider(
                "an OpenTelemetryMiddleware in the app was made before otel_bgtasks.instrument(app) and keeps only "
                "a tracer"
            )
    equip(app)  # an OpenTelemetryMiddleware made before instrument(), around the app or in its built stack
    return ensure_request_spans(app, tracer_provider, meter_provider)


def uninstrument() -> None:
    """Remove every patch ``instrument()`` made; tasks created while instrumented still run normally."""
    from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor, instrumentor_lock

    instrumentor = BackgroundTasksInstrumentor()
    with instrumentor_lock:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
