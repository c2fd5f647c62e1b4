"""Contrib's request metrics end with the response, not with the background tasks after it (issue 14).

Each test serves a request whose route answers at once and queues a task that holds until the test
releases it. While the task is held (the response is complete, the task is running) the test collects
the metrics once: with otel_bgtasks ``http.server.active_requests`` is back to 0 and, once the request is
over, its duration leaves out the time the task was held; without it the request is still active, and
its duration covers the time the task was held. Real SDK ``MeterProvider`` with an
``InMemoryMetricReader``, real FastAPI and Starlette apps driven through httpx's ASGI transport (which
awaits the whole app, tasks included), a real uvicorn server, and ``opentelemetry-instrument`` in a
subprocess for the zero-code setup and both semantic conventions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentry_sdk
from _servers import serving
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.asgi.version import __version__ as asgi_version
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import TracerProvider
from packaging.version import Version
from sentry_sdk.integrations.starlette import StarletteIntegration
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import otel_bgtasks
from otel_bgtasks import request_metrics
from otel_bgtasks.config import resolve

try:
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor
except ImportError:  # not in the test extra: its newest release lags the other contrib packages and pins them back
    StarletteInstrumentor = None

needs_starlette_instrumentor = pytest.mark.skipif(
    StarletteInstrumentor is None, reason="opentelemetry-instrumentation-starlette is not installed"
)

OLD_DURATION = "http.server.duration"  # milliseconds, the old HTTP semantic conventions
NEW_DURATION = "http.server.request.duration"  # seconds, the stable ones (contrib >= 0.48b0)
ACTIVE = "http.server.active_requests"
HOLD_SECONDS = 0.1  # how long at least a task is held: a request measured with its task takes this long
WAIT_SECONDS = 10
NATIVE_TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


# -- Metrics as the reader collects them ------------------------------------------------------------


@dataclass(frozen=True)
class Duration:
    """One data point of a request duration histogram, in seconds whatever the metric's unit."""

    attributes: frozenset[tuple[str, Any]]
    count: int
    seconds: float


@dataclass(frozen=True)
class Snapshot:
    durations: dict[str, list[Duration]]  # by metric name; a metric without a point is absent
    active: int  # http.server.active_requests, over all its points


def snapshot(reader: InMemoryMetricReader) -> Snapshot:
    return read(reader.get_metrics_data())


def read(data: MetricsData | None) -> Snapshot:
    durations: dict[str, list[Duration]] = {}
    active = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points: Any = metric.data.data_points
                if metric.name in (OLD_DURATION, NEW_DURATION):
                    scale = {"ms": 1000, "s": 1}[metric.unit or ""]
                    durations.setdefault(metric.name, []).extend(
                        Duration(frozenset(p.attributes.items()), p.count, p.sum / scale) for p in points if p.count
                    )
                elif metric.name == ACTIVE:
                    active += sum(p.value for p in points)
    return Snapshot({name: found for name, found in durations.items() if found}, active)


def only_duration(state: Snapshot) -> Duration:
    """The one request's one data point, the same in every duration metric contrib emits."""
    assert state.durations, "no request duration recorded"
    points = [point for found in state.durations.values() for point in found]
    assert all(point.count == 1 for point in points) and len(points) == len(state.durations), state
    return points[0]


def status_codes(state: Snapshot) -> set[Any]:
    return {
        value
        for found in state.durations.values()
        for point in found
        for key, value in point.attributes
        if key in ("http.status_code", "http.response.status_code")
    }


# -- A task that holds until released ---------------------------------------------------------------


@dataclass
class Held:
    """A background task that says when it starts (the response is complete by then) and waits to be released."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def run(self) -> None:
        self.started.set()
        await asyncio.to_thread(self.release.wait, WAIT_SECONDS)

    def run_in_thread(self) -> None:  # a ``def`` task: Starlette runs it in its thread pool
        self.started.set()
        self.release.wait(WAIT_SECONDS)


@dataclass
class Served:
    during: Snapshot  # while the task was held
    after: Snapshot  # once the whole request, task included, was over
    until_snapshot: float  # from before the request was sent to the collection while the task was held
    held_seconds: float  # from the task's start to its release


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_SECONDS), "timed out"


async def hold_and_release(held: Held, readers: list[InMemoryMetricReader], sent_at: float) -> list[Served]:
    """With the task started and held: collect once, keep it held at least HOLD_SECONDS, release it.

    Returns, per reader, what it had while the task was held; ``after`` is filled in by :func:`finished`.
    """
    await wait_for(held.started)
    started = time.perf_counter()
    during = [snapshot(reader) for reader in readers]
    until_snapshot = time.perf_counter() - sent_at
    await asyncio.sleep(max(0.0, HOLD_SECONDS - (time.perf_counter() - started)))  # a known length, not a sync
    held.release.set()
    held_seconds = time.perf_counter() - started
    return [Served(state, Snapshot({}, 0), until_snapshot, held_seconds) for state in during]


def finished(served: list[Served], readers: list[InMemoryMetricReader]) -> list[Served]:
    return [replace(one, after=snapshot(reader)) for one, reader in zip(served, readers, strict=True)]


async def serve_held(app: Any, held: Held, *readers: InMemoryMetricReader, path: str = "/") -> Served:
    """One request to ``app`` whose task is ``held``; what the first reader saw (see ``serve_held_all``)."""
    return (await serve_held_all(app, held, list(readers), path))[0]


async def serve_held_all(app: Any, held: Held, readers: list[InMemoryMetricReader], path: str = "/") -> list[Served]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        sent_at = time.perf_counter()
        request = asyncio.create_task(client.get(path))
        served = await hold_and_release(held, readers, sent_at)
        response = await asyncio.wait_for(request, WAIT_SECONDS)
    assert response.status_code == 200
    return finished(served, readers)


MS_ROUNDING = 0.0005  # the old convention records whole milliseconds, rounded


def assert_ends_with_response(served: Served) -> None:
    """The request no longer active while its task ran; its duration leaves the task's time out.

    Contrib records the duration once its call is over, after the tasks: the data point comes then (a
    release that recorded it at the response would have it while the task ran, the same value).
    """
    assert served.during.active == 0
    assert served.during.durations in ({}, served.after.durations)
    only_duration(served.after)
    assert served.after.active == 0
    for point in (point for points in served.after.durations.values() for point in points):  # ms and s alike
        assert point.seconds <= served.until_snapshot + MS_ROUNDING  # the snapshot came before the hold


def assert_includes_task(served: Served) -> None:
    """Today's behaviour: nothing recorded while the task runs, the request active, then the task's time counted."""
    assert served.during.durations == {}
    assert served.during.active == 1
    point = only_duration(served.after)
    assert served.after.active == 0
    assert point.seconds >= served.held_seconds - MS_ROUNDING


# -- The setups -------------------------------------------------------------------------------------

SETUPS = [
    "instrument(fastapi_app)",
    "instrument(starlette_app)",
    "FastAPIInstrumentor",
    pytest.param("StarletteInstrumentor", marks=needs_starlette_instrumentor),
    "add_middleware by hand",
]


def fastapi_app(held: Held | None = None) -> FastAPI:
    app = FastAPI(telemetry=NATIVE_TELEMETRY_OFF)  # type: ignore[call-arg]

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, str]:
        if held is not None:
            background_tasks.add_task(held.run)
        return {"status": "ok"}

    return app


def starlette_app(held: Held) -> Starlette:
    async def route(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(held.run))

    return Starlette(routes=[Route("/", route)])


@dataclass
class Setup:
    """An app whose requests contrib's middleware measures, put there one way; otel_bgtasks on or off."""

    name: str
    fixed: bool
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def app(self, held: Held) -> Any:
        meter_provider = MeterProvider([self.reader])
        providers: dict[str, Any] = {"tracer_provider": self.tracer_provider, "meter_provider": meter_provider}
        app: Any = starlette_app(held) if "starlette" in self.name.lower() else fastapi_app(held)
        if self.name == "FastAPIInstrumentor":
            FastAPIInstrumentor.instrument_app(app, **providers)
            self.undo.append(lambda: FastAPIInstrumentor.uninstrument_app(app))
        elif self.name == "StarletteInstrumentor":
            assert StarletteInstrumentor is not None
            StarletteInstrumentor.instrument_app(app, **providers)
            self.undo.append(lambda: StarletteInstrumentor.uninstrument_app(app))
        elif self.name == "add_middleware by hand":
            app.add_middleware(OpenTelemetryMiddleware, **providers)
        if self.name.startswith("instrument("):
            # otel_bgtasks adds the middleware itself; "without" is its option turned off.
            otel_bgtasks.instrument(app, **providers, request_metrics_end_at_response=self.fixed)
        elif self.fixed:
            otel_bgtasks.instrument(app, **providers)  # finds the app's request spans and adds none
        return app


@pytest.fixture
def setups(tracer_provider: TracerProvider) -> Iterator[Callable[[str, bool], Setup]]:
    made: list[Setup] = []

    def make(name: str, fixed: bool) -> Setup:
        made.append(Setup(name, fixed, tracer_provider))
        return made[-1]

    yield make
    for setup in made:
        for undo in setup.undo:
            undo()


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
@pytest.mark.parametrize("name", SETUPS)
async def test_request_metrics_end_with_the_response(
    setups: Callable[[str, bool], Setup], name: str, fixed: bool
) -> None:
    setup = setups(name, fixed)
    held = Held()
    served = await serve_held(setup.app(held), held, setup.reader)
    if fixed:
        assert_ends_with_response(served)
    else:
        assert_includes_task(served)
    # In-process the semantic conventions are contrib's default: the old ones (see the subprocess test for both).
    assert set(served.after.durations) == {OLD_DURATION}
    assert status_codes(served.after) == {200}


async def test_def_task_in_the_thread_pool(setups: Callable[[str, bool], Setup]) -> None:
    setup = setups("add_middleware by hand", True)
    held = Held()
    app = setup.app(held)

    @app.get("/sync")
    def sync_route(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(held.run_in_thread)
        return {"status": "ok"}

    assert_ends_with_response(await serve_held(app, held, setup.reader, path="/sync"))


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
async def test_a_task_the_route_awaits_itself_ends_nothing(setups: Callable[[str, bool], Setup], fixed: bool) -> None:
    """``await BackgroundTask(audit)()`` in the route runs before the response: the request stays active.

    Its duration covers the route's own time after it (in whole milliseconds, the old conventions' unit),
    and only the queued task, run by the response, is left out.
    """
    setup = setups("add_middleware by hand", fixed)
    held = Held()
    app = setup.app(held)
    active_in_route: list[int] = []

    async def audit() -> None:
        pass

    @app.get("/inline")
    async def inline_route(background_tasks: BackgroundTasks) -> dict[str, str]:
        await BackgroundTask(audit)()
        await asyncio.sleep(ROUTE_SECONDS)
        active_in_route.append(snapshot(setup.reader).active)
        background_tasks.add_task(held.run)
        return {"status": "ok"}

    served = await serve_held(app, held, setup.reader, path="/inline")
    assert active_in_route == [1]
    point = only_duration(served.after)
    assert point.seconds >= ROUTE_SECONDS - MS_ROUNDING
    if fixed:
        assert served.during.active == 0  # the queued task runs after the response: that one ends the request
        assert point.seconds <= served.until_snapshot + MS_ROUNDING  # the held task's time left out
    else:
        assert_includes_task(served)


ROUTE_SECONDS = 0.15


async def test_middleware_in_a_stack_built_before_instrument(tracer_provider: TracerProvider) -> None:
    """``instrument(app)`` reaches a contrib middleware the app's already built ``middleware_stack`` holds."""
    held = Held()
    reader = InMemoryMetricReader()
    app = fastapi_app(held)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]))
    app.middleware_stack = app.build_middleware_stack()  # as Starlette does at the first request
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    assert_ends_with_response(await serve_held(app, held, reader))


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
async def test_streamed_response(setups: Callable[[str, bool], Setup], fixed: bool) -> None:
    setup = setups("instrument(starlette_app)", fixed)
    held = Held()

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"one ", b"two ", b"three"):
            yield chunk

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), background=BackgroundTask(held.run))

    app = setup.app(held)
    app.router.routes.append(Route("/stream", stream))
    served = await serve_held(app, held, setup.reader, path="/stream")
    if fixed:
        assert_ends_with_response(served)
    else:
        assert_includes_task(served)


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
async def test_client_gone_during_a_stream(setups: Callable[[str, bool], Setup], fixed: bool) -> None:
    """The client disconnects after the first chunk: Starlette stops the stream and runs the task."""
    setup = setups("instrument(starlette_app)", fixed)
    held = Held()
    never = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield b"first chunk"
        await never.wait()
        yield b"never sent"

    async def stream(request: Request) -> Response:
        return StreamingResponse(endless(), background=BackgroundTask(held.run))

    app = setup.app(held)
    app.router.routes.append(Route("/endless", stream))
    first_chunk, gone = asyncio.Event(), asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        message = next(messages, None)
        if message is None:
            await gone.wait()
            message = {"type": "http.disconnect"}
        return message

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},  # no spec_version 2.4: Starlette listens for the disconnect
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/endless",
        "raw_path": b"/endless",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent_at = time.perf_counter()
    serving_request = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(first_chunk.wait(), WAIT_SECONDS)
    gone.set()
    held_served = await hold_and_release(held, [setup.reader], sent_at)
    await asyncio.wait_for(serving_request, WAIT_SECONDS)
    (served,) = finished(held_served, [setup.reader])

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    if fixed:
        assert_ends_with_response(served)
    else:
        assert_includes_task(served)
    assert status_codes(served.after) == {200}


class TaskFailed(Exception):
    pass


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
async def test_failing_task_changes_neither_status_nor_exception(
    setups: Callable[[str, bool], Setup], fixed: bool
) -> None:
    setup = setups("FastAPIInstrumentor", fixed)
    app = setup.app(Held())

    async def fail() -> None:
        raise TaskFailed("task broke")

    @app.get("/fails")
    async def route(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(fail)
        return {"status": "ok"}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        with pytest.raises(TaskFailed, match="task broke"):  # it reaches the server as before
            await client.get("/fails")
    state = snapshot(setup.reader)
    only_duration(state)
    assert status_codes(state) == {200}
    assert state.active == 0


async def test_requests_without_tasks_record_what_they_did(setups: Callable[[str, bool], Setup]) -> None:
    """The same data points with and without otel_bgtasks: metric names, attributes, counts."""
    recorded: list[set[tuple[str, frozenset[tuple[str, Any]], int]]] = []
    for fixed in (True, False):
        setup = setups("add_middleware by hand", fixed)
        app = setup.app(Held())

        @app.get("/plain")
        async def plain() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            async def chunks() -> AsyncIterator[bytes]:
                yield b"a"
                yield b"b"

            return StreamingResponse(chunks())

        @app.get("/raises")
        async def raises() -> None:
            raise TaskFailed("route broke")

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            for path in ("/plain", "/plain", "/stream"):
                assert (await client.get(path)).status_code == 200
            with pytest.raises(TaskFailed, match="route broke"):
                await client.get("/raises")
        state = snapshot(setup.reader)
        assert state.active == 0
        recorded.append({(n, p.attributes, p.count) for n, found in state.durations.items() for p in found})
        otel_bgtasks.uninstrument()
    assert recorded[0] == recorded[1]
    assert {count for _, _, count in recorded[0]} == {1, 2}


async def test_context_after_the_tasks_is_what_it_was(tracer_provider: TracerProvider) -> None:
    """Code that runs after the tasks, inside contrib's middleware, still sees the request span as current;
    nothing of the request's context is left behind in the caller's."""
    seen: dict[bool, str] = {}
    for fixed in (True, False):
        held = Held()
        held.release.set()
        app = fastapi_app(held)

        def after_the_tasks(app: Any, fixed: bool = fixed) -> Any:
            async def middleware(scope: Any, receive: Any, send: Any) -> None:
                await app(scope, receive, send)
                if scope["type"] == "http":
                    seen[fixed] = getattr(trace.get_current_span(), "name", "")

            return middleware

        app.add_middleware(after_the_tasks)  # inside the OpenTelemetryMiddleware instrument() adds
        otel_bgtasks.instrument(app, tracer_provider=tracer_provider, request_metrics_end_at_response=fixed)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            assert (await client.get("/")).status_code == 200
        assert held.started.is_set()
        assert trace.get_current_span() is trace.INVALID_SPAN
        otel_bgtasks.uninstrument()
    assert seen == {True: "GET /", False: "GET /"}


async def test_two_middlewares_each_end_with_the_response(tracer_provider: TracerProvider) -> None:
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    held = Held()
    app = fastapi_app(held)
    for reader in readers:
        app.add_middleware(
            OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=MeterProvider([reader])
        )
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    for served in await serve_held_all(app, held, readers):
        assert_ends_with_response(served)
    # In the caller's context (an in-process client) what is left is the last request's holder, finished and
    # linked to nothing still running: the next request replaces it, nothing accumulates.
    left: Any = request_metrics._current.get()  # pyright: ignore[reportPrivateUsage]
    assert left is None or (left[request_metrics._FINISHED] and left[request_metrics._OUTER][request_metrics._FINISHED])  # pyright: ignore[reportPrivateUsage]


async def passing_through(request: Request, call_next: Any) -> Response:
    return await call_next(request)


@pytest.mark.parametrize("where", ["inside", "outside"])
async def test_base_http_middleware(tracer_provider: TracerProvider, where: str) -> None:
    """Starlette's BaseHTTPMiddleware runs what is inside it in a task group's task, in a copy of the context."""
    reader = InMemoryMetricReader()
    held = Held()
    app = fastapi_app(held)
    contrib = {"tracer_provider": tracer_provider, "meter_provider": MeterProvider([reader])}
    if where == "inside":  # Starlette wraps the later one around the earlier one
        app.add_middleware(BaseHTTPMiddleware, dispatch=passing_through)
        app.add_middleware(OpenTelemetryMiddleware, **contrib)
    else:
        app.add_middleware(OpenTelemetryMiddleware, **contrib)
        app.add_middleware(BaseHTTPMiddleware, dispatch=passing_through)
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    assert_ends_with_response(await serve_held(app, held, reader))


async def test_background_set_by_a_base_http_middleware(tracer_provider: TracerProvider) -> None:
    """A middleware sets ``background`` on ``call_next``'s response: its task also runs after the response."""
    reader = InMemoryMetricReader()
    held = Held()
    app = fastapi_app()  # the route queues nothing

    async def add_task(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.background = BackgroundTask(held.run)
        return response

    app.add_middleware(BaseHTTPMiddleware, dispatch=add_task)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]))
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    assert_ends_with_response(await serve_held(app, held, reader))


def test_instruments_copy_and_pickle_as_contribs() -> None:
    """The proxies on a middleware's instruments copy and pickle as the instruments themselves (wrapt's refuse)."""

    def outcomes() -> list[str]:
        found = []
        for meter_provider in (None, MeterProvider()):
            middleware = OpenTelemetryMiddleware(Starlette(), meter_provider=meter_provider)
            histogram = getattr(middleware, "duration_histogram_old", None) or middleware.duration_histogram
            for instrument in (middleware.active_requests_counter, histogram):
                for how in (copy.copy, copy.deepcopy, lambda i: pickle.loads(pickle.dumps(i))):
                    try:
                        found.append(type(how(instrument)).__qualname__)
                    except Exception as exc:
                        found.append(f"{type(exc).__name__}: {exc}")
        return found

    uninstrumented = outcomes()
    otel_bgtasks.instrument()
    assert outcomes() == uninstrumented


class NotingHeld(Held):
    """A held task that first, before any await, notes what the reader has: its synchronous start."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        super().__init__()
        self.reader = reader
        self.at_start: list[Snapshot] = []

    async def run(self) -> None:
        self.at_start.append(snapshot(self.reader))
        await super().run()


@pytest.mark.parametrize("name", SETUPS)
async def test_recorded_before_the_task_begins(setups: Callable[[str, bool], Setup], name: str) -> None:
    """The request is off the active count before the task's first line runs, even a task that never awaits."""
    setup = setups(name, True)
    held = NotingHeld(setup.reader)
    served = await serve_held(setup.app(held), held, setup.reader)
    (at_start,) = held.at_start
    assert at_start == served.during
    assert_ends_with_response(served)


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
async def test_real_uvicorn_server(setups: Callable[[str, bool], Setup], fixed: bool) -> None:
    setup = setups("FastAPIInstrumentor", fixed)
    held = Held()
    with serving(setup.app(held)) as server:
        async with httpx.AsyncClient() as client:
            sent_at = time.perf_counter()
            response = await client.get(server.url + "/")  # the response is there; its task runs on
        assert response.status_code == 200
        held_served = await hold_and_release(held, [setup.reader], sent_at)
    (served,) = finished(held_served, [setup.reader])  # the server has stopped: the task is over
    if fixed:
        assert_ends_with_response(served)
    else:
        assert_includes_task(served)


async def test_sentry_wraps_the_middleware_too(tracer_provider: TracerProvider) -> None:
    """sentry-sdk's Starlette integration replaces middleware classes' ``__call__`` with a plain function, once
    per process and for good, around ours or under it depending on which came first: the fix works either
    way, the wrapper of ours it may keep does nothing once uninstrumented, and instrumenting again works."""
    sentry_sdk.init(integrations=[StarletteIntegration()], auto_enabling_integrations=False)
    try:
        for fixed in (True, False, True):
            if fixed:
                otel_bgtasks.instrument(tracer_provider=tracer_provider)
            reader = InMemoryMetricReader()
            held = Held()
            app = fastapi_app(held)
            app.add_middleware(
                OpenTelemetryMiddleware, tracer_provider=tracer_provider, meter_provider=MeterProvider([reader])
            )
            served = await serve_held(app, held, reader)
            assert getattr(vars(OpenTelemetryMiddleware)["__call__"], "__module__", "").startswith("sentry_sdk")
            if fixed:
                assert_ends_with_response(served)
            else:
                assert_includes_task(served)
            otel_bgtasks.uninstrument()
    finally:
        sentry_sdk.Scope.get_global_scope().set_client(None)  # off, as never initialised: see sentry_set_aside


# -- Installing and removing ------------------------------------------------------------------------


@pytest.fixture
def original_methods() -> dict[str, Any]:
    """Contrib's ``__call__`` and ``__init__`` as this test found them (sentry-sdk may have wrapped ``__call__``)."""
    return {name: vars(OpenTelemetryMiddleware)[name] for name in ("__call__", "__init__")}


def assert_contrib_untouched(original: dict[str, Any]) -> None:
    assert {name: vars(OpenTelemetryMiddleware)[name] for name in original} == original
    assert "app" not in vars(OpenTelemetryMiddleware)


def test_uninstrument_restores_contrib_exactly(original_methods: dict[str, Any]) -> None:
    assert_contrib_untouched(original_methods)
    otel_bgtasks.instrument()
    assert vars(OpenTelemetryMiddleware)["__call__"] is original_methods["__call__"]  # never touched
    assert vars(OpenTelemetryMiddleware)["__init__"] is not original_methods["__init__"]
    assert not hasattr(OpenTelemetryMiddleware, "app")
    otel_bgtasks.uninstrument()
    assert_contrib_untouched(original_methods)


async def test_uninstrument_while_a_task_runs(
    setups: Callable[[str, bool], Setup], original_methods: dict[str, Any]
) -> None:
    """A request whose metrics ended with its response finishes normally, counted once, after uninstrument()."""
    setup = setups("add_middleware by hand", True)
    held = Held()
    app = setup.app(held)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        request = asyncio.create_task(client.get("/"))
        await wait_for(held.started)
        assert snapshot(setup.reader).active == 0
        otel_bgtasks.uninstrument()
        assert_contrib_untouched(original_methods)
        held.release.set()
        assert (await asyncio.wait_for(request, WAIT_SECONDS)).status_code == 200
    state = snapshot(setup.reader)
    only_duration(state)
    assert state.active == 0


def test_option_and_environment_variable(monkeypatch: pytest.MonkeyPatch, original_methods: dict[str, Any]) -> None:
    assert resolve({}, {}).request_metrics_end_at_response is True
    variable = "OTEL_PYTHON_BGTASKS_REQUEST_METRICS_END_AT_RESPONSE"
    assert resolve({}, {variable: "false"}).request_metrics_end_at_response is False
    assert resolve({"request_metrics_end_at_response": True}, {variable: "false"}).request_metrics_end_at_response
    with pytest.raises(ValueError, match="request_metrics_end_at_response must be true or false"):
        resolve({"request_metrics_end_at_response": "sometimes"})

    monkeypatch.setenv(variable, "off")
    otel_bgtasks.instrument()
    assert_contrib_untouched(original_methods)


class EndsAtResponse(OpenTelemetryMiddleware):
    """What a contrib release that fixes #3591 would do: record with its own instruments at the last body chunk."""

    durations_only = False  # True: like the fix proposed for #3591, the active count still at the call's end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        attributes = {"http.method": scope["method"]}
        self.active_requests_counter.add(1, attributes)
        recorded = False

        def record() -> None:
            histogram = getattr(self, "duration_histogram_old", None) or getattr(self, "duration_histogram", None)
            assert histogram is not None
            histogram.record(max(round((time.perf_counter() - start) * 1000), 0), attributes)

        async def ending_send(message: Any) -> None:
            nonlocal recorded
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not recorded:
                recorded = True
                record()
                if not self.durations_only:
                    self.active_requests_counter.add(-1, attributes)

        try:
            await self.app(scope, receive, ending_send)
        finally:
            if not recorded:
                record()
            if self.durations_only or not recorded:
                self.active_requests_counter.add(-1, attributes)


class EndsDurationsAtResponse(EndsAtResponse):
    durations_only = True


@pytest.mark.parametrize("middleware", [EndsAtResponse, EndsDurationsAtResponse])
async def test_a_release_that_ends_at_the_response_is_measured_as_it_measures(
    tracer_provider: TracerProvider, middleware: type[EndsAtResponse]
) -> None:
    """Records made before the first task pass through as they are: no second decrement, no adjusted duration."""
    reader = InMemoryMetricReader()
    held = Held()
    app = fastapi_app(held)
    app.add_middleware(middleware, tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]))
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    served = await serve_held(app, held, reader)
    assert served.during.durations == served.after.durations != {}  # recorded at the response, by the middleware
    assert_ends_with_response(served)


# -- Zero-code, both semantic conventions -----------------------------------------------------------

INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
MARKER = "METRICS-JSON:"
SCRIPT = textwrap.dedent(
    '''
    """One request under opentelemetry-instrument; its task holds while the metrics are exported once."""

    import asyncio
    import json
    import threading
    import time

    import httpx
    from fastapi import BackgroundTasks, FastAPI
    from opentelemetry import metrics

    started, release = threading.Event(), threading.Event()
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})


    def held():
        started.set()
        release.wait(10)


    @app.get("/")
    async def route(background_tasks: BackgroundTasks):
        background_tasks.add_task(held)
        return {"status": "ok"}


    def export(label):
        print(label, flush=True)  # the console exporter prints the collected metrics after it
        metrics.get_meter_provider().force_flush()


    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            sent_at = time.perf_counter()
            request = asyncio.create_task(client.get("/"))
            assert await asyncio.to_thread(started.wait, 10)
            held_from = time.perf_counter()
            export("MARKER during")
            until_snapshot = time.perf_counter() - sent_at
            await asyncio.sleep(HOLD)
            release.set()
            held_seconds = time.perf_counter() - held_from
            assert (await request).status_code == 200
        export("MARKER after " + json.dumps([until_snapshot, held_seconds]))


    asyncio.run(main())
    '''
).replace("MARKER", MARKER)


def run_zero_code(tmp_path: Path, **env: str) -> tuple[Served, set[str]]:
    script = tmp_path / "one_request.py"
    script.write_text(SCRIPT.replace("HOLD", repr(HOLD_SECONDS)))
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    environ.update(
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="console",
        OTEL_METRIC_EXPORT_INTERVAL="3600000",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SEMCONV_STABILITY_OPT_IN="http/dup",
        **env,
    )
    completed = subprocess.run(
        [str(INSTRUMENT), sys.executable, str(script)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    states: list[Snapshot] = []
    names: set[str] = set()
    until_snapshot = held_seconds = 0.0
    for part in completed.stdout.split(MARKER)[1:]:
        label, _, exported = part.partition("\n")
        label = label.strip()
        if label.startswith("after"):
            until_snapshot, held_seconds = json.loads(label.split(" ", 1)[1])
        decoder = json.JSONDecoder()
        document, _ = decoder.raw_decode(exported.strip())
        states.append(read_exported(document, names))
    during, after = states
    return Served(during, after, until_snapshot, held_seconds), names


def read_exported(document: dict[str, Any], names: set[str]) -> Snapshot:
    """The console exporter's JSON, read as :func:`read` reads ``MetricsData``."""
    durations: dict[str, list[Duration]] = {}
    active = 0
    for resource_metrics in document["resource_metrics"]:
        for scope_metrics in resource_metrics["scope_metrics"]:
            for metric in scope_metrics["metrics"]:
                names.add(metric["name"])
                points = metric["data"]["data_points"]
                if metric["name"] in (OLD_DURATION, NEW_DURATION):
                    scale = {"ms": 1000, "s": 1}[metric["unit"]]
                    durations.setdefault(metric["name"], []).extend(
                        Duration(frozenset(p["attributes"].items()), p["count"], p["sum"] / scale)
                        for p in points
                        if p["count"]
                    )
                elif metric["name"] == ACTIVE:
                    active += sum(p["value"] for p in points)
    return Snapshot({name: found for name, found in durations.items() if found}, active)


@pytest.mark.parametrize("fixed", [True, False], ids=["otel_bgtasks", "without"])
def test_opentelemetry_instrument_both_semantic_conventions(tmp_path: Path, fixed: bool) -> None:
    env = {} if fixed else {"OTEL_PYTHON_BGTASKS_REQUEST_METRICS_END_AT_RESPONSE": "false"}
    served, names = run_zero_code(tmp_path, **env)
    emitted = {OLD_DURATION, NEW_DURATION} if Version(asgi_version) >= Version("0.48b0") else {OLD_DURATION}
    assert emitted <= names
    assert set(served.after.durations) == emitted
    if fixed:
        assert_ends_with_response(served)
    else:
        assert_includes_task(served)
    assert status_codes(served.after) == {200}
