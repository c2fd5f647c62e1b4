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

- ``instrument(app=None, *, tracer_provider=None, meter_provider=None, mode=None, **options)``:
  patch task creation and execution process-wide (calling it again changes nothing) and, given an
  app, add request spans to it unless it already has them. Returns the app to serve.
- ``uninstrument()``: restore every patched attribute.
- ``mode="child"`` (default): a task's span is a child of the span current when it was queued.
  ``mode="link"``: each task starts a new trace whose root links to that span.
- ``task_options(timeout=...)``: a decorator giving one task function its own timeout.
- Options can also be set with ``OTEL_PYTHON_BGTASKS_<OPTION>`` environment variables; explicit
  arguments win.
"""

from __future__ import annotations

from typing import Any, TypeVar

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor, instrumentor_lock, watch_imports
from otel_bgtasks.request_spans import ensure_request_spans
from otel_bgtasks.task_options import task_options
from otel_bgtasks.version import __version__

__all__ = ["BackgroundTasksInstrumentor", "__version__", "instrument", "task_options", "uninstrument"]

_App = TypeVar("_App")


def instrument(
    app: _App = None,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    mode: str | None = None,
    **options: Any,
) -> _App:
    """Trace every background task; with ``app``, also make sure its requests are traced.

    Raises:
        TypeError: an option that does not exist.
        ValueError: an option value that is not allowed; the message lists what is.
    """
    if mode is not None:
        options["mode"] = mode
    instrumentor = BackgroundTasksInstrumentor()
    watch_imports()  # before the lock: see there
    with instrumentor_lock:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    if app is None:
        return app
    return ensure_request_spans(app, tracer_provider, meter_provider)  # type: ignore[no-any-return]


def uninstrument() -> None:
    """Remove every patch ``instrument()`` made; tasks created while instrumented still run normally."""
    instrumentor = BackgroundTasksInstrumentor()
    with instrumentor_lock:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
