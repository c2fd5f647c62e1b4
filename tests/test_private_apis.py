"""The few private names of other packages otel_bgtasks reads, each behind one function: these tests fail
loudly the day one of them disappears, instead of a feature going quiet."""

from __future__ import annotations

import pytest
import sentry_sdk
from conftest import HAS_NATIVE_TELEMETRY, needs_native_telemetry
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from sentry_sdk.integrations.dedupe import DedupeIntegration
from starlette.background import BackgroundTask

import otel_bgtasks
from otel_bgtasks import contrib_fastapi, request_spans, sentry


def test_sentry_dedupe_can_still_be_told_to_forget_the_last_exception() -> None:
    """sentry._forget_last_seen: the public reset_last_seen() (sentry-sdk >= 2.x), else the integration's _last_seen."""
    if not hasattr(DedupeIntegration, "reset_last_seen"):
        assert hasattr(DedupeIntegration(), "_last_seen")


def test_sentry_scope_still_keeps_the_route_as_its_transaction_name() -> None:
    """sentry._sentry_route reads Scope._transaction: Sentry has no public getter for the name."""
    scope = sentry_sdk.Scope()
    scope.set_transaction_name("/orders/{order_id}")
    assert sentry._sentry_route(scope) == "/orders/{order_id}"  # pyright: ignore[reportPrivateUsage]


def test_contrib_still_keeps_its_original_call_under_the_marker() -> None:
    """contrib_fastapi.MARKER: where opentelemetry-instrumentation-fastapi keeps BackgroundTask.__call__."""
    original = vars(BackgroundTask)["__call__"]
    app = FastAPI()
    FastAPIInstrumentor.instrument_app(app)
    try:
        patched = vars(BackgroundTask)["__call__"] is not original
        if patched:  # it must still say where it keeps the original
            assert vars(BackgroundTask).get(contrib_fastapi.MARKER) is original
            assert contrib_fastapi.contrib_original_call() is original
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    if not patched:
        pytest.skip("this opentelemetry-instrumentation-fastapi does not patch BackgroundTask at all (before 0.5x)")
    assert vars(BackgroundTask)["__call__"] is original


@needs_native_telemetry
def test_fastapi_still_keeps_its_telemetry_settings_on_the_app() -> None:
    """request_spans reads FastAPI's app._telemetry (tracing on, its tracer_provider)."""
    provider = TracerProvider()
    app = FastAPI(telemetry={"tracer_provider": provider})  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    assert HAS_NATIVE_TELEMETRY
    assert request_spans.native_tracer_provider(app) is provider
    assert request_spans.has_request_spans(app)
    otel_bgtasks.uninstrument()
