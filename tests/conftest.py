"""Shared fixtures: one real SDK tracer provider for the session, a clean exporter and patch state per test.

Also what many test files need alike: FastAPI's native telemetry switched off, the patch-state snapshot
taken before any test instrumented anything, and a clean slate for the once-per-place internal-error log.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import wrapt
from fastapi import FastAPI
from fastapi import background as fastapi_background
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from packaging.version import Version
from starlette import background as starlette_background
from starlette import concurrency as starlette_concurrency

import otel_bgtasks
from otel_bgtasks import guard, metrics

if TYPE_CHECKING:
    from _sentry_endpoint import SentryEndpoint

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
# The global provider can be set once per process; FastAPI's native telemetry and contrib's
# instrumentors read it, so every test shares this one and gets a cleared exporter.
trace.set_tracer_provider(_provider)


# FastAPI >= 0.163 traces requests and tasks itself; older releases accept (and ignore) ``telemetry=``.
HAS_NATIVE_TELEMETRY = "telemetry" in inspect.signature(FastAPI).parameters
needs_native_telemetry = pytest.mark.skipif(
    not HAS_NATIVE_TELEMETRY, reason="this FastAPI has no native telemetry (added in 0.163)"
)


# contrib's instrument_app() gives the OpenTelemetryMiddleware it makes its tracer_provider up to 0.47b0, which
# otel_bgtasks sees; from 0.48b0 only a tracer made from it, out of public reach when instrument_app() came first
# (README).
CONTRIB_GIVES_A_TRACER = Version(importlib.metadata.version("opentelemetry-instrumentation-fastapi")) >= Version(
    "0.48b0"
)
# FastAPI's ``telemetry=`` with everything off: ``instrument(app)`` then adds its ASGI middleware, and the
# request span is that middleware's. ``WITHOUT_NATIVE_TELEMETRY`` is the same as ``FastAPI(**...)`` arguments.
NATIVE_TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}
WITHOUT_NATIVE_TELEMETRY: dict[str, Any] = {"telemetry": NATIVE_TELEMETRY_OFF}


def starlettes_refusal(kind: str) -> str:
    """The message of the ``TypeError`` Starlette's own ``run_in_threadpool`` raises for a task that is not callable.

    ``kind`` is ``"coroutine"`` (``add_task(send_email(...))``) or ``"None"``. Starlette's, not ours: newer
    releases bind the task with ``functools.partial`` first ("the first argument must be callable"); 0.27, the
    oldest supported, hands it to anyio's worker thread, which calls it ("'coroutine' object is not callable").
    Found by running it, uninstrumented (the original saved at import), on an event loop of its own.
    """

    async def sleeper() -> None:
        pass

    async def refused() -> str:
        probe = sleeper() if kind == "coroutine" else None
        try:
            await starlette_concurrency.run_in_threadpool(probe)  # type: ignore[arg-type]
        except TypeError as exc:
            return str(exc)
        finally:
            if probe is not None:
                probe.close()
        raise AssertionError(f"Starlette ran a {kind} as a task")

    with ThreadPoolExecutor(1) as pool:  # callable from a test whose event loop is running
        return pool.submit(anyio.run, refused).result()


def with_native(values: list[str]) -> list[object]:
    """``parametrize`` values, those naming a native-telemetry setup skipped where FastAPI has none."""
    return [pytest.param(v, marks=needs_native_telemetry) if "native" in v else v for v in values]


@pytest.fixture
def receiver() -> Iterator[SentryEndpoint]:
    """Sentry's endpoint on 127.0.0.1 for one test, with Sentry off until the test initialises it."""
    from _sentry_endpoint import SentryEndpoint  # imports sentry_sdk: here, as most tests run without it

    with sentry_set_aside():  # Sentry off to start with, the client found put back after
        receiver = SentryEndpoint()
        yield receiver
        receiver.close()


@pytest.fixture
def tracer_provider() -> TracerProvider:
    return _provider


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture(autouse=True)
def _clean_patches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends uninstrumented, whatever it did, with the histograms' series bound unspent.

    The bound is the process's (otel_bgtasks/metrics.py): a test that makes thousands of task functions
    would otherwise leave every later test's new functions in the overflow series.
    """
    otel_bgtasks.uninstrument()
    monkeypatch.setattr(metrics, "_histogram_series", metrics._Series())  # pyright: ignore[reportPrivateUsage]
    yield
    otel_bgtasks.uninstrument()


def task_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("BackgroundTask ")]


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


@contextmanager
def sentry_set_aside() -> Iterator[None]:
    """Sentry off (its non-recording client) inside, whatever an earlier test left; that client put back after.

    ``sentry_sdk.init()`` without a DSN is no inactive client: it makes an event of every ERROR record with an
    exception, reading the locals of its frames, and runs it through its integrations (DedupeIntegration keeps
    the exception) before dropping it for want of a transport. Imported here, not at the top: importing
    sentry_sdk is what switches otel_bgtasks' "auto" forwarding on.
    """
    import sentry_sdk

    scope = sentry_sdk.Scope.get_global_scope()
    previous = scope.client
    scope.set_client(None)
    try:
        yield
    finally:
        if scope.client is not previous:
            scope.client.close(timeout=0)  # the test flushed what it meant to send
        scope.set_client(previous)


@pytest.fixture
def fresh_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The internal-error guard logs once per place per process: give this test a clean slate."""
    monkeypatch.setattr(guard, "_seen", set())


PEER_MARKER = "_otel_original_call"  # where opentelemetry-instrumentation-fastapi keeps the original __call__


def patch_state() -> dict[str, Any]:
    """Every attribute otel_bgtasks patches, as it is now (``None``: FastAPI does not override ``__call__``)."""
    return {
        "starlette BackgroundTask.__init__": vars(starlette_background.BackgroundTask)["__init__"],
        "starlette BackgroundTask.__call__": vars(starlette_background.BackgroundTask)["__call__"],
        "starlette BackgroundTasks.__call__": vars(starlette_background.BackgroundTasks)["__call__"],
        "starlette.background.run_in_threadpool": starlette_background.run_in_threadpool,
        "fastapi BackgroundTasks.__call__": vars(fastapi_background.BackgroundTasks).get("__call__"),
        # otel_bgtasks watches contrib's uninstrument_app() to put its own wrapper back after it, and its
        # instrument_app() to withdraw the request spans instrument(app) added before it.
        "FastAPIInstrumentor.instrument_app": vars(FastAPIInstrumentor)["instrument_app"],
        "FastAPIInstrumentor.uninstrument_app": vars(FastAPIInstrumentor)["uninstrument_app"],
        # Request metrics that end with the response: proxies on each new middleware's instruments.
        "OpenTelemetryMiddleware.__init__": vars(OpenTelemetryMiddleware)["__init__"],
    }


ORIGINALS = patch_state()  # at import, before any test instruments anything


def assert_originals_restored() -> None:
    """Starlette, FastAPI and contrib's instrumentor are exactly as they were: the same objects, no marker left."""
    state = patch_state()
    assert {name: value for name, value in state.items() if value is not ORIGINALS[name]} == {}
    assert not any(isinstance(value, wrapt.ObjectProxy) for value in state.values())
    assert starlette_background.run_in_threadpool is starlette_concurrency.run_in_threadpool
    assert not hasattr(starlette_background.BackgroundTask, PEER_MARKER)
