"""Exactly one span per task execution, whatever else traces the app.

The setups: otel_bgtasks alone, with FastAPI's native telemetry (>= 0.163: it would open a
``fastapi.background_task`` span per task), with opentelemetry-instrumentation-fastapi (it would patch
``BackgroundTask.__call__`` with a bare ``BackgroundTask <name>`` span) applied before or after
otel_bgtasks, and with both. Each test drives a real FastAPI app through httpx's ASGI transport, which
awaits the whole app, background tasks included, then removes every instrumentation and checks that
Starlette's classes are exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import (
    CONTRIB_GIVES_A_TRACER,
    NATIVE_TELEMETRY_OFF,
    ORIGINALS,
    PEER_MARKER,
    assert_originals_restored,
    patch_state,
    spans_named,
    task_spans,
    with_native,
)
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette import background as starlette_background

import otel_bgtasks


class TaskFailed(Exception):
    pass


ran: list[str] = []


def succeed() -> None:
    ran.append("succeed")


def fail() -> None:
    ran.append("fail")
    raise TaskFailed("task broke")


def never_runs() -> None:
    ran.append("never_runs")


def function_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


@dataclass(frozen=True)
class Setup:
    native: bool  # FastAPI's native telemetry on, with the test tracer provider
    contrib: str | None  # opentelemetry-instrumentation-fastapi applied "before" or "after" otel_bgtasks


SETUPS = {
    "alone": Setup(native=False, contrib=None),
    "native": Setup(native=True, contrib=None),
    "contrib-before": Setup(native=False, contrib="before"),
    "contrib-after": Setup(native=False, contrib="after"),
    "native+contrib-before": Setup(native=True, contrib="before"),
    "native+contrib-after": Setup(native=True, contrib="after"),
}

SCENARIOS: dict[str, tuple[Callable[[], None], ...]] = {
    "success": (succeed,),
    "failure-then-skipped": (fail, never_runs),
}


@pytest.fixture(autouse=True)
def _reset_ran() -> None:
    ran.clear()


def make_app(
    setup: Setup, tracer_provider: TracerProvider, funcs: tuple[Callable[[], None], ...], sync: bool
) -> FastAPI:
    """A FastAPI app whose route queues ``funcs``; ``app.state.creating`` gets the span current in the route."""
    telemetry: dict[str, Any] = {"tracer_provider": tracer_provider} if setup.native else NATIVE_TELEMETRY_OFF
    app = FastAPI(telemetry=telemetry)  # type: ignore[arg-type]
    app.state.creating = []

    def queue(background_tasks: BackgroundTasks) -> dict[str, bool]:
        app.state.creating.append(trace.get_current_span().get_span_context())
        for func in funcs:
            background_tasks.add_task(func)
        return {"ok": True}

    if sync:
        app.get("/")(queue)
    else:

        @app.get("/")
        async def queue_async(background_tasks: BackgroundTasks) -> dict[str, bool]:
            return queue(background_tasks)

    return app


def instrument(app: FastAPI, setup: Setup, tracer_provider: TracerProvider) -> None:
    if setup.contrib == "before":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    if setup.contrib == "after":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)


def uninstrument(app: FastAPI, contrib_first: bool = True) -> None:
    if contrib_first:
        FastAPIInstrumentor.uninstrument_app(app)
        otel_bgtasks.uninstrument()
    else:
        otel_bgtasks.uninstrument()
        FastAPIInstrumentor.uninstrument_app(app)


async def get(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/")


def creating_span(exporter: InMemorySpanExporter, app: FastAPI) -> ReadableSpan:
    """The finished span that was current in the route when the tasks were queued."""
    assert len(app.state.creating) == 1
    context = app.state.creating[0]
    assert context.is_valid, "the route ran without a current span"
    matches = [s for s in exporter.get_finished_spans() if s.context.span_id == context.span_id]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize("sync", [False, True], ids=["async-route", "sync-route"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("setup_name", with_native(list(SETUPS)))
async def test_exactly_one_span_per_task(
    setup_name: str, scenario: str, sync: bool, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    setup = SETUPS[setup_name]
    funcs = SCENARIOS[scenario]
    app = make_app(setup, tracer_provider, funcs, sync)
    instrument(app, setup, tracer_provider)
    try:
        response = await get(app)
    finally:
        uninstrument(app)
    assert_originals_restored()

    assert response.status_code == 200
    assert ran == ["succeed"] if scenario == "success" else ["fail"]

    creator = creating_span(exporter, app)
    if setup.native and setup.contrib is None:
        # FastAPI's native telemetry runs the endpoint inside its own operation span.
        assert creator.name == "fastapi.endpoint"
    else:
        # Contrib's ASGI middleware (or the one otel_bgtasks adds) is the request span; when native
        # telemetry sees it in the stack, it stays out of the way.
        assert creator.name == "GET /"
        assert not spans_named(exporter, "fastapi.endpoint")

    # FastAPI's native task span is replaced by ours, never added to it.
    assert not spans_named(exporter, "fastapi.background_task")
    # Every span named like a task span is ours (contrib's bare one would lack our attributes)...
    prefixed = [s for s in exporter.get_finished_spans() if s.name.startswith("BackgroundTask")]
    assert prefixed == task_spans(exporter)
    for span in prefixed:
        assert span.attributes is not None
        assert "code.function.name" in span.attributes, f"{span.name} is not otel_bgtasks' span"
        assert "background_task.outcome" in span.attributes
    # ...and there is exactly one per queued task.
    spans = sorted(task_spans(exporter), key=lambda s: s.attributes["background_task.index"])  # type: ignore[index]
    assert [s.name for s in spans] == [f"BackgroundTask {func.__qualname__}" for func in funcs]

    for index, (span, func) in enumerate(zip(spans, funcs, strict=True)):
        attributes = dict(span.attributes or {})
        assert span.kind is SpanKind.INTERNAL
        assert attributes["code.function.name"] == function_name(func)
        assert attributes["code.file.path"] == __file__
        assert attributes["code.line.number"] == func.__code__.co_firstlineno
        assert attributes["background_task.index"] == index
        assert attributes["background_task.execution"] == "threadpool"
        assert span.parent is not None
        assert span.parent.span_id == creator.context.span_id
        assert span.context.trace_id == creator.context.trace_id

    outcomes = [s.attributes["background_task.outcome"] for s in spans]  # type: ignore[index]
    if scenario == "success":
        assert outcomes == ["success"]
        assert spans[0].status.status_code is not StatusCode.ERROR
    else:
        assert outcomes == ["error", "skipped"]
        failed, skipped = spans
        assert failed.attributes["error.type"] == function_name(TaskFailed)  # type: ignore[index]
        assert failed.status.status_code is StatusCode.ERROR
        assert [e.name for e in failed.events] == ["exception"]
        assert skipped.status.status_code is not StatusCode.ERROR
        assert "error.type" not in (skipped.attributes or {})


@pytest.mark.parametrize("contrib_first", [True, False], ids=["contrib-uninstrumented-first", "ours-first"])
@pytest.mark.parametrize("contrib", ["before", "after"], ids=["contrib-applied-before", "contrib-applied-after"])
async def test_both_uninstrumented_restore_starlette_exactly(
    contrib: str, contrib_first: bool, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    setup = Setup(native=False, contrib=contrib)
    app = make_app(setup, tracer_provider, (succeed,), sync=False)
    instrument(app, setup, tracer_provider)
    assert patch_state()["starlette BackgroundTask.__call__"] is not ORIGINALS["starlette BackgroundTask.__call__"]
    uninstrument(app, contrib_first=contrib_first)
    assert_originals_restored()

    # Nothing left behind: a fresh app's task runs, untraced.
    fresh = make_app(Setup(native=False, contrib=None), tracer_provider, (succeed,), sync=False)
    assert (await get(fresh)).status_code == 200
    assert ran == ["succeed"]
    assert task_spans(exporter) == []
    assert not spans_named(exporter, "fastapi.background_task")


@pytest.mark.parametrize("setup_name", with_native(["native", "contrib-before"]))
async def test_without_otel_bgtasks_the_peers_open_their_own_task_spans(
    setup_name: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The control: the spans the tests above rule out really are what the peers emit on their own."""
    setup = SETUPS[setup_name]
    app = make_app(setup, tracer_provider, (succeed,), sync=False)
    if setup.contrib:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
        if not hasattr(starlette_background.BackgroundTask, PEER_MARKER):
            FastAPIInstrumentor.uninstrument_app(app)
            pytest.skip("this opentelemetry-instrumentation-fastapi release does not trace background tasks")
    try:
        assert (await get(app)).status_code == 200
    finally:
        if setup.contrib:
            FastAPIInstrumentor.uninstrument_app(app)
    assert_originals_restored()

    assert ran == ["succeed"]
    if setup.native:
        assert len(spans_named(exporter, "fastapi.background_task")) == 1
        assert task_spans(exporter) == []
    else:
        (bare,) = task_spans(exporter)
        assert bare.name == "BackgroundTask succeed"
        assert "code.function.name" not in (bare.attributes or {})


def assert_only_our_task_spans(exporter: InMemorySpanExporter, func: Callable[..., Any]) -> None:
    prefixed = [s for s in exporter.get_finished_spans() if s.name.startswith("BackgroundTask")]
    assert [(s.name, (s.attributes or {}).get("code.function.name")) for s in prefixed] == [
        (f"BackgroundTask {func.__qualname__}", function_name(func))
    ]


async def test_contrib_uninstrumented_first_leaves_otel_bgtasks_tracing(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Contrib's uninstrument_app() puts back the __call__ it kept; otel_bgtasks must keep tracing."""
    setup = SETUPS["contrib-before"]
    app = make_app(setup, tracer_provider, (succeed,), sync=False)
    instrument(app, setup, tracer_provider)
    FastAPIInstrumentor.uninstrument_app(app)
    try:
        assert otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
        fresh = make_app(SETUPS["alone"], tracer_provider, (succeed,), sync=False)
        otel_bgtasks.instrument(fresh, tracer_provider=tracer_provider)
        assert (await get(fresh)).status_code == 200
    finally:
        otel_bgtasks.uninstrument()
    assert_originals_restored()
    assert ran == ["succeed"]
    assert_only_our_task_spans(exporter, succeed)


async def test_contrib_reapplied_to_another_app_adds_no_second_task_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Contrib's uninstrument_app() deletes the marker; its next instrument_app() must still add no bare span."""
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    first = make_app(SETUPS["alone"], tracer_provider, (succeed,), sync=False)
    FastAPIInstrumentor.instrument_app(first, tracer_provider=tracer_provider)
    FastAPIInstrumentor.uninstrument_app(first)
    second = make_app(SETUPS["alone"], tracer_provider, (succeed,), sync=False)
    FastAPIInstrumentor.instrument_app(second, tracer_provider=tracer_provider)
    try:
        assert (await get(second)).status_code == 200
    finally:
        uninstrument(second)
    assert_originals_restored()
    assert ran == ["succeed"]
    assert_only_our_task_spans(exporter, succeed)


@pytest.mark.parametrize("order", ["otel_bgtasks-first", "contrib-first"])
async def test_one_request_span_whichever_instruments_the_app_first(
    order: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """instrument(app) adds request spans; contrib's instrument_app(app) after it must not add a second set."""
    setup = Setup(native=False, contrib="after" if order == "otel_bgtasks-first" else "before")
    app = make_app(setup, tracer_provider, (succeed,), sync=False)
    instrument(app, setup, tracer_provider)
    try:
        for _ in range(2):
            assert (await get(app)).status_code == 200
    finally:
        uninstrument(app)
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == ["GET /", "GET /"]
    tasks = task_spans(exporter)
    assert len(tasks) == 2
    assert {t.parent.span_id for t in tasks if t.parent} == {s.context.span_id for s in servers}
    assert_originals_restored()


def exporting_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    own_exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own_exporter))
    return provider, own_exporter


contrib_before = pytest.param(
    "contrib_before",
    marks=pytest.mark.xfail(
        CONTRIB_GIVES_A_TRACER,
        strict=True,
        reason="contrib >= 0.48b0, instrument_app(tracer_provider=) before instrument(app): out of reach (README)",
    ),
)


@pytest.mark.parametrize("peer", [*with_native(["native", "contrib"]), contrib_before])
async def test_task_spans_follow_the_request_spans_to_the_peers_own_provider(
    peer: str, exporter: InMemorySpanExporter
) -> None:
    """The app's request instrumentation has its own provider; instrument(app) was given none: tasks go there too.

    ``contrib_before``: contrib's ``instrument_app(app, tracer_provider=...)`` before ``instrument(app)``, the
    set-up of a FastAPI without native telemetry (before 0.163); its middleware entry holds the provider.
    """
    provider, own_exporter = exporting_provider()
    contrib = {"contrib": "after", "contrib_before": "before"}.get(peer)
    setup = Setup(native=peer == "native", contrib=contrib)
    app = make_app(setup, provider, (succeed,), sync=False)
    if contrib == "before":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    otel_bgtasks.instrument(app)
    if contrib == "after":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        assert (await get(app)).status_code == 200
    finally:
        uninstrument(app) if contrib else otel_bgtasks.uninstrument()
    assert task_spans(exporter) == []  # not the global provider's
    (task,) = task_spans(own_exporter)
    assert task.name == "BackgroundTask succeed"
    assert task.parent is not None and task.parent.span_id == app.state.creating[0].span_id
