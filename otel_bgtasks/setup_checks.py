"""Two set-up mistakes that leave task spans unseen or alone, each said once, when the first task starts.

Both are silent otherwise: with no SDK (and no provider given to otel_bgtasks, FastAPI's native telemetry,
contrib's ``instrument_app()`` or an ``OpenTelemetryMiddleware`` made after ``instrument()``, which task spans
follow), task spans go nowhere, and so do request spans unless their middleware was handed a provider
otel_bgtasks cannot see (then said as such: :data:`UNSEEN_PROVIDER`); with nothing tracing the requests
(a plain Starlette app under ``opentelemetry-instrument`` without the Starlette instrumentation), each
task span is the root of a trace of its own. The first task tells: after it, checking costs one flag.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.context import Context

from otel_bgtasks.install import pip_install

_logger = logging.getLogger("otel_bgtasks")

NO_SDK = (
    "No OpenTelemetry SDK is set up: the global tracer provider is still the API's default, so every span, "
    "background tasks' included, goes nowhere. Under opentelemetry-instrument, look above for 'Failed to auto "
    f"initialize OpenTelemetry' (a missing exporter: {pip_install('zero-code')}; or pass "
    "--traces_exporter/--metrics_exporter/--logs_exporter); in code, call "
    "opentelemetry.trace.set_tracer_provider(TracerProvider(...)) before the first request, or pass "
    "tracer_provider= to otel_bgtasks.instrument()."
)
NO_REQUEST_SPAN = (
    "Background task %s started with no span current where it was queued: its span starts a trace of its own, "
    "tied to no request, and so will every task of a request nothing traces. Pass the app to "
    "otel_bgtasks.instrument(app), which adds request spans; under opentelemetry-instrument, install the "
    "instrumentation of the framework: pip install 'opentelemetry-instrumentation-starlette>=0.55b0' (older "
    "releases declare Starlette 0.13 only, and opentelemetry-instrument skips them) or "
    f"opentelemetry-instrumentation-fastapi; {pip_install('zero-code')} brings both."
)

UNSEEN_PROVIDER = (
    "No OpenTelemetry SDK is set as the global one, and the request spans go to a tracer provider otel_bgtasks "
    "cannot see (%s), so background tasks' spans go nowhere. Pass the same provider as tracer_provider= to "
    "otel_bgtasks.instrument(), or call otel_bgtasks.instrument() first (before "
    "FastAPIInstrumentor.instrument_app() or OpenTelemetryMiddleware(app, ...)): task spans then follow it."
)

_lock = threading.Lock()
# What instrument(app) found tracing requests with a provider it cannot see (see note_unseen_provider()).
_unseen: str | None = None
# Set by arm() at each instrument(), cleared by the first task that starts; read by the hot path, which calls
# check_first_task() only while it is set.
pending = False


def _never() -> bool:
    return False


_spans_recorded: Callable[[], bool] = _never


def arm(spans_recorded: Callable[[], bool], spans_wanted: bool = True) -> None:
    """Check the next task to start: called by each ``instrument()``.

    Args:
        spans_recorded: whether task spans go to a provider, asked when the first task starts: the one given
            to ``instrument()``, the one the app gave FastAPI's native telemetry or contrib's
            ``instrument_app()`` (followed since), or an SDK set as the global one.
        spans_wanted: ``False`` when the provider given is a no-op one: spans going nowhere is the point.
    """
    global pending, _spans_recorded, _unseen
    with _lock:
        pending = spans_wanted
        _spans_recorded = spans_recorded
        _unseen = None  # what an earlier instrumentation saw is not this one's


def note_unseen_provider(where: str) -> None:
    """Requests are traced with a provider otel_bgtasks cannot see (``where``): said if no SDK is found later."""
    global _unseen
    _unseen = where


def check_first_task(creating: Context, task_name: str) -> None:
    """At the first task since ``instrument()``: warn if no SDK is set up, or else if no span created the task."""
    global pending
    if not pending:
        return
    with _lock:
        if not pending:
            return
        pending = False
    if not _spans_recorded() and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        if _unseen is not None:  # the request spans do go somewhere: say where the task spans are lost
            _logger.warning(UNSEEN_PROVIDER, _unseen)
        else:
            _logger.warning(NO_SDK)  # no request span either, then: this is the cause
    elif not trace.get_current_span(creating).get_span_context().is_valid:
        _logger.warning(NO_REQUEST_SPAN, task_name)
