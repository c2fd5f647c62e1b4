"""Make sure an app has request spans, so that task spans have a request to belong to."""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # pyright: ignore[reportMissingTypeStubs]

_logger = logging.getLogger("otel_bgtasks")

# The middleware entries otel_bgtasks added, per app: withdrawn if the app is instrumented otherwise later.
_added: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _native_tracing(app: Any) -> bool:
    """FastAPI >= 0.163 traces requests itself when its telemetry is on and a tracer provider is set."""
    config = getattr(app, "_telemetry", None)
    if not isinstance(config, dict) or not config.get("tracing", False):  # pyright: ignore[reportUnknownMemberType]
        return False
    if config.get("tracer_provider") is not None:  # pyright: ignore[reportUnknownMemberType]
        return True
    # FastAPI's own test: the global provider is still the API's proxy until an SDK sets one.
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def native_tracer_provider(app: Any) -> trace.TracerProvider | None:
    """The tracer provider FastAPI's native telemetry was given for ``app``, if any."""
    config = getattr(app, "_telemetry", None)
    if not isinstance(config, dict) or not config.get("tracing", False):  # pyright: ignore[reportUnknownMemberType]
        return None
    provider = config.get("tracer_provider")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return provider if isinstance(provider, trace.TracerProvider) else None


def queuing_apps_provider(creating: Context) -> trace.TracerProvider | None:
    """The provider FastAPI's native telemetry was given by the app whose request, traced by it, queues a task.

    ``fastapi.telemetry.get_telemetry_data()`` (public, FastAPI >= 0.163) finds the request in the creating
    context while the request is handled, and the request its app (``scope["app"]``, set by FastAPI before
    its telemetry runs). ``None`` for a request it does not trace, or without FastAPI's telemetry imported.
    """
    telemetry = sys.modules.get("fastapi.telemetry")
    get_telemetry_data = getattr(telemetry, "get_telemetry_data", None)
    if get_telemetry_data is None:
        return None
    data = get_telemetry_data(creating)
    request = getattr(data, "request", None) or getattr(data, "websocket", None)
    scope = getattr(request, "scope", None)
    return native_tracer_provider(scope.get("app")) if isinstance(scope, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]


def has_request_spans(app: Any) -> bool:
    """Whether requests to ``app`` already get spans: from an ASGI middleware, contrib's instrumentors or FastAPI."""
    if isinstance(app, OpenTelemetryMiddleware) or getattr(app, "_is_instrumented_by_opentelemetry", False):
        return True
    for middleware in getattr(app, "user_middleware", ()):
        cls = getattr(middleware, "cls", None)
        if isinstance(cls, type) and issubclass(cls, OpenTelemetryMiddleware):
            return True
    return _native_tracing(app)


def ensure_request_spans(app: Any, tracer_provider: trace.TracerProvider | None, meter_provider: Any) -> Any:
    """Add ``OpenTelemetryMiddleware`` to ``app`` unless something already traces its requests.

    Returns the app to serve: ``app`` itself for Starlette and FastAPI (the middleware is added in
    place), or the middleware around it for any other ASGI callable.
    """
    if has_request_spans(app):
        return app
    add_middleware = getattr(app, "add_middleware", None)
    if add_middleware is None:
        return OpenTelemetryMiddleware(app, tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        add_middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=meter_provider)
        _added[app] = app.user_middleware[0]  # Starlette inserts it first
    except RuntimeError as exc:
        # Starlette refuses middleware once the app has started serving.
        _logger.warning(
            "otel_bgtasks could not add request spans to %r (%s): background tasks are traced, but without a "
            "request span to belong to. Call otel_bgtasks.instrument(app) before the app starts, or add "
            "opentelemetry.instrumentation.asgi.OpenTelemetryMiddleware yourself.",
            app,
            exc,
        )
    return app


def withdraw_request_spans(app: Any) -> None:
    """Take back the middleware :func:`ensure_request_spans` added, before another instrumentation adds its own.

    opentelemetry-instrumentation-fastapi's ``instrument_app(app)`` does not look for an existing
    middleware: without this, every request would get two server spans. Its options win, as the later call.
    """
    entry = _added.pop(app, None)
    middleware = getattr(app, "user_middleware", None)
    if entry is None or not isinstance(middleware, list) or getattr(app, "middleware_stack", None) is not None:
        return
    middleware[:] = [item for item in middleware if item is not entry]  # pyright: ignore[reportUnknownVariableType]


def traces_with_a_given_provider(middleware: Any) -> bool:
    """Whether a contrib middleware traces with a provider it was given, or the global SDK's: not the API's.

    Given none while no SDK is set, it holds the API's ``ProxyTracer`` (or a no-op tracer). It keeps only a
    tracer: its provider is seen as an argument, by ``request_metrics``' wrapper of ``__init__``, or never
    (the SDK's tracer names its provider nowhere public; its constructor changed across SDK releases).
    """
    tracer = getattr(middleware, "tracer", None)
    return tracer is not None and not isinstance(tracer, (trace.ProxyTracer, trace.NoOpTracer))


def traced_with_an_unseen_provider(app: Any) -> bool:
    """Whether a contrib middleware in ``app``, made before ``instrument()``, may trace with a provider unseen."""
    return any(traces_with_a_given_provider(middleware) for middleware in contrib_middlewares(app))


def contrib_middlewares(app: Any) -> Iterator[Any]:
    """Contrib's ``OpenTelemetryMiddleware`` instances in ``app``: itself, those it wraps, and in its built stack.

    Follows ``app``'s ``.app`` and Starlette's built ``middleware_stack``, a few levels deep.
    """
    seen: set[int] = set()
    pending = [app]
    while pending and len(seen) < 64:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OpenTelemetryMiddleware):
            yield current
        for name in ("app", "middleware_stack"):
            inner: Any = getattr(current, "__dict__", {}).get(name)
            if inner is not None:
                pending.append(inner)
