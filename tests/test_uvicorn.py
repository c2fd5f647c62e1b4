"""Against a real uvicorn server: task spans keep the span that queued them, across threads and requests.

Each test serves a FastAPI app from a uvicorn server on 127.0.0.1 (an ephemeral port) in a thread, talks
to it over real sockets, then stops it and joins the thread before asserting: uvicorn's shutdown waits
for every response cycle, background tasks included, so every span has ended and been exported by then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from _servers import WAIT_SECONDS, Countdown, serving
from _spans import add_work_route, assert_each_request_keeps_its_tasks, tag_task_span
from conftest import NATIVE_TELEMETRY_OFF, spans_named, task_spans, with_native
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_bgtasks

# How the app gets request spans: the ASGI middleware otel_bgtasks.instrument(app) adds, FastAPI's
# native telemetry, or opentelemetry-instrumentation-fastapi (applied before otel_bgtasks).
SETUPS = ["asgi", "native", "contrib"]


def make_app(setup: str, tracer_provider: TracerProvider) -> FastAPI:
    telemetry: dict[str, Any] = {"tracer_provider": tracer_provider} if setup == "native" else NATIVE_TELEMETRY_OFF
    return FastAPI(telemetry=telemetry)  # type: ignore[arg-type]


@contextmanager
def instrumented(app: FastAPI, setup: str, tracer_provider: TracerProvider) -> Iterator[FastAPI]:
    if setup == "contrib":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider)
    try:
        yield otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    finally:
        if setup == "contrib":
            FastAPIInstrumentor.uninstrument_app(app)


def by_id(exporter: InMemorySpanExporter) -> dict[int, ReadableSpan]:
    return {span.context.span_id: span for span in exporter.get_finished_spans()}


def request_span(spans: dict[int, ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    """The SERVER span above ``span``."""
    current = span
    while current.kind is not SpanKind.SERVER:
        assert current.parent is not None, f"{span.name} has no request span above it"
        current = spans[current.parent.span_id]
    return current


def two_tasks() -> tuple[Countdown, Callable[[], None], Callable[[], Awaitable[None]]]:
    """A countdown of two, and a sync and an async background task that each tick it once."""
    countdown = Countdown(2)

    def sync_task() -> None:
        countdown.tick()

    async def async_task() -> None:
        countdown.tick()

    return countdown, sync_task, async_task


async def get_once(app: FastAPI, setup: str, tracer_provider: TracerProvider, path: str, countdown: Countdown) -> None:
    """Serve ``app`` instrumented as ``setup``, GET ``path`` (expecting a 200), wait for the countdown, stop."""
    with instrumented(app, setup, tracer_provider) as served, serving(served) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT_SECONDS) as client:
            response = await client.get(path)
        assert response.status_code == 200
        assert countdown.done.wait(WAIT_SECONDS), "the background tasks did not run"


@pytest.mark.parametrize("setup", with_native(SETUPS))
async def test_sync_route_span_is_the_task_parent(
    setup: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """opentelemetry-python-contrib#3586: a task queued inside a span opened in a ``def`` route belongs to it."""
    tracer = tracer_provider.get_tracer("tests.uvicorn")
    countdown, sync_task, async_task = two_tasks()
    route_threads: list[threading.Thread] = []
    app = make_app(setup, tracer_provider)

    @app.get("/sync")
    def sync_route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        route_threads.append(threading.current_thread())
        with tracer.start_as_current_span("route work"):
            background_tasks.add_task(sync_task)
            background_tasks.add_task(async_task)
        return {"ok": True}

    await get_once(app, setup, tracer_provider, "/sync", countdown)

    # The route ran in a worker thread, neither the test's nor the server's event loop thread.
    (route_thread,) = route_threads
    assert route_thread is not threading.current_thread()
    assert route_thread.name != "uvicorn"
    spans = by_id(exporter)
    (route_span,) = spans_named(exporter, "route work")
    tasks = sorted(task_spans(exporter), key=lambda s: s.name)
    assert [s.name for s in tasks] == ["BackgroundTask " + f.__qualname__ for f in (async_task, sync_task)]
    for task in tasks:
        assert task.parent is not None
        assert task.parent.span_id == route_span.context.span_id, f"{task.name} is not a child of the route span"
        assert task.context.trace_id == route_span.context.trace_id
        assert task.attributes is not None
        assert task.attributes["background_task.outcome"] == "success"
    assert {t.attributes["background_task.execution"] for t in tasks} == {"async", "threadpool"}  # type: ignore[index]
    # The route span itself sits in the request's trace, under its server span.
    server = request_span(spans, route_span)
    assert server.name == "GET /sync"
    assert not spans_named(exporter, "fastapi.background_task")


@pytest.mark.parametrize("setup", with_native(SETUPS))
async def test_async_route_tasks_are_children_of_the_request(
    setup: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    countdown, sync_task, async_task = two_tasks()
    app = make_app(setup, tracer_provider)

    @app.get("/async")
    async def async_route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(sync_task)
        background_tasks.add_task(async_task)
        return {"ok": True}

    await get_once(app, setup, tracer_provider, "/async", countdown)

    spans = by_id(exporter)
    (server,) = [s for s in spans.values() if s.kind is SpanKind.SERVER]
    assert server.name == "GET /async"
    tasks = task_spans(exporter)
    assert len(tasks) == 2
    for task in tasks:
        assert task.parent is not None
        creator = spans[task.parent.span_id]
        if setup == "native":
            # FastAPI runs the endpoint inside its own operation span, under the request span.
            assert creator.name == "fastapi.endpoint"
            assert creator.parent is not None
            assert creator.parent.span_id == server.context.span_id
        else:
            assert creator is server
        assert task.context.trace_id == server.context.trace_id


REQUESTS = 50
TASKS_PER_REQUEST = 2


@pytest.mark.parametrize("setup", with_native(["asgi", "native"]))
async def test_concurrent_requests_each_keep_their_own_tasks(
    setup: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    countdown = Countdown(REQUESTS * TASKS_PER_REQUEST)
    # Every request's first task waits until all of them have started, so that all 50 requests'
    # tasks are in flight together on the server's event loop.
    arrived = 0
    all_arrived = asyncio.Event()

    async def first_task(request_id: int) -> None:
        nonlocal arrived
        tag_task_span(request_id)
        arrived += 1
        if arrived == REQUESTS:
            all_arrived.set()
        await asyncio.wait_for(all_arrived.wait(), WAIT_SECONDS)
        countdown.tick()

    def second_task(request_id: int) -> None:
        tag_task_span(request_id)
        countdown.tick()

    app = make_app(setup, tracer_provider)

    add_work_route(app, first_task, second_task)

    # No keep-alive: a connection whose previous request still runs its tasks is never reused.
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    with instrumented(app, setup, tracer_provider) as served, serving(served) as running:
        async with httpx.AsyncClient(base_url=running.url, limits=limits, timeout=WAIT_SECONDS) as client:
            responses = await asyncio.gather(*(client.get(f"/work/{i}") for i in range(REQUESTS)))
        assert [r.json() for r in responses] == [{"request_id": i} for i in range(REQUESTS)]
        assert countdown.done.wait(WAIT_SECONDS), "the background tasks did not all run"

    spans = by_id(exporter)
    servers = [s for s in spans.values() if s.kind is SpanKind.SERVER]
    assert len(servers) == REQUESTS
    assert len({s.context.trace_id for s in servers}) == REQUESTS

    tasks = task_spans(exporter)
    assert len(tasks) == REQUESTS * TASKS_PER_REQUEST

    def creator_of(task: ReadableSpan) -> ReadableSpan:
        assert task.parent is not None
        creator = spans[task.parent.span_id]
        is_creator: Callable[[ReadableSpan], bool] = (
            (lambda s: s.name == "fastapi.endpoint") if setup == "native" else (lambda s: s.kind is SpanKind.SERVER)
        )
        assert is_creator(creator), creator.name
        server = request_span(spans, creator)
        assert task.context.trace_id == server.context.trace_id
        return creator

    assert_each_request_keeps_its_tasks(tasks, REQUESTS, (first_task, second_task), creator_of)
