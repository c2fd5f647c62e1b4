"""Reliability: otel_bgtasks under load, faults, races and shutdown, on real uvicorn servers on 127.0.0.1.

Each test is bounded in requests and time. Nothing is mocked except the faults themselves (a tracer, a
meter and a Sentry transport that raise), which cannot be produced by the real SDKs on demand.
Synchronisation is by events, conditions and joins, never by sleeping.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import _faults
import httpx
import pytest
import sentry_sdk
from _faults import MeterDownForOtelBgtasks, TracerDownForOtelBgtasks
from _metrics import metrics_by_name, points
from _servers import (
    WAIT_SECONDS,
    Countdown,
    SilentEndpoint,
    closed_port,
    get_many,
    recording,
    records_not_retained,
    serving,
)
from _spans import add_work_route, assert_each_request_keeps_its_tasks, tag_task_span
from conftest import NATIVE_TELEMETRY_OFF, assert_originals_restored, task_spans
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sentry_sdk.transport import Transport
from starlette import background as starlette_background

import otel_bgtasks
from otel_bgtasks.task_state import TaskRun, TaskState

INTERNAL_ERROR = "otel_bgtasks failed internally"


def make_app(**kwargs: Any) -> FastAPI:
    """A FastAPI app whose request spans come from the ASGI middleware ``instrument(app)`` adds."""
    return FastAPI(telemetry=NATIVE_TELEMETRY_OFF, **kwargs)  # type: ignore[arg-type]


async def get_all(client: httpx.AsyncClient, paths: Iterable[str], concurrency: int) -> list[httpx.Response]:
    """GET every path, ``concurrency`` at a time; the responses in the order of ``paths``."""
    pending = list(enumerate(paths))
    responses: list[httpx.Response | None] = [None] * len(pending)
    queue = iter(pending)

    async def worker() -> None:
        for index, path in queue:
            responses[index] = await client.get(path)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert all(r is not None for r in responses)
    return responses  # type: ignore[return-value]


def internal_errors(records: Sequence[logging.LogRecord]) -> Counter[tuple[str, str, int]]:
    """otel_bgtasks' internal-error records, counted per place: exception type and the line that raised."""
    places: Counter[tuple[str, str, int]] = Counter()
    for record in records:
        if not record.getMessage().startswith(INTERNAL_ERROR):
            continue
        assert record.exc_info is not None and record.exc_info[1] is not None
        error = record.exc_info[1]
        tb = error.__traceback__
        assert tb is not None
        while tb.tb_next is not None:
            tb = tb.tb_next
        places[(type(error).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno)] += 1
    return places


def point_values(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    """Each data point of otel_bgtasks' metric ``name``: its attributes and its value."""
    return [(dict(key), point.value) for key, point in points(metrics_by_name(reader)[name]).items()]


def live(kind: type[Any], where: Callable[[Any], bool] = lambda _: True) -> int:
    gc.collect()
    # type(), not isinstance(): that also reads obj.__class__, which on pydantic 2.1's deprecated Extra warns.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), kind) and where(obj))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def earlier_objects_frozen() -> Iterator[None]:
    """Leave what pytest and earlier tests hold out of full collections while this test runs.

    A full collection of the whole test session's heap holds the GIL long enough to read as event-loop lag.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# -- 1. The exporter's endpoint is down --------------------------------------------------------------

ENDPOINT_DOWN_REQUESTS = 2000
ENDPOINT_DOWN_WARMUP = 400  # enough to fill the BatchSpanProcessor queue (about 5 spans per request)
ENDPOINT_DOWN_CONCURRENCY = 20
# The collector accepts and never answers, so each export waits its whole timeout: a loop that waited for an
# export would stall EXPORT_TIMEOUT seconds or more. Scheduling noise alone (GC, GIL, other work on 2 shared
# cores) measured up to 0.25 s idle, 0.67 s with three CPU hogs, 2.7 s once under a loaded suite run.
EXPORT_TIMEOUT = 10
MAX_LOOP_LAG = EXPORT_TIMEOUT / 2
MAX_RSS_GROWTH = 64 * 1024 * 1024
BSP_QUEUE, BSP_BATCH = 2048, 512  # BatchSpanProcessor defaults


class RecordingOTLPSpanExporter(OTLPSpanExporter):
    """The real OTLP/HTTP exporter, counting the exports it began and keeping the result of each it ended."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.begun = 0
        self.results: list[SpanExportResult] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.begun += 1
        try:
            result = super().export(spans)
        except Exception:
            # Older releases (1.25) raise requests' ConnectionError where newer ones return FAILURE.
            self.results.append(SpanExportResult.FAILURE)
            raise
        self.results.append(result)
        return result


class LoopLag:
    """How late the server's event loop wakes a sleeper: a loop blocked for 1 s shows a 1 s lag."""

    def __init__(self) -> None:
        self.max = 0.0
        self.samples = 0

    async def probe(self, interval: float = 0.01) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.max = max(self.max, loop.time() - before - interval)
            self.samples += 1


async def test_exporter_endpoint_down_tasks_run_memory_bounded_loop_unblocked() -> None:
    collector = SilentEndpoint()
    url = f"http://127.0.0.1:{collector.port}"
    resource = Resource.create({"service.name": "otel-bgtasks-endpoint-down"})
    span_exporter = RecordingOTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=EXPORT_TIMEOUT)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    metric_exporter = OTLPMetricExporter(endpoint=f"{url}/v1/metrics", timeout=EXPORT_TIMEOUT)
    metric_reader = PeriodicExportingMetricReader(
        metric_exporter, export_interval_millis=500, export_timeout_millis=EXPORT_TIMEOUT * 1000
    )
    meter_provider = MeterProvider(metric_readers=[metric_reader], resource=resource)
    countdown = Countdown(ENDPOINT_DOWN_REQUESTS * 2)
    lag = LoopLag()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        probe = asyncio.create_task(lag.probe())
        try:
            yield
        finally:
            probe.cancel()
            with suppress(asyncio.CancelledError):
                await probe

    async def async_task(request_id: int) -> None:
        countdown.tick()

    def sync_task(request_id: int) -> None:
        countdown.tick()

    app = make_app(lifespan=lifespan)

    @app.get("/work/{request_id}")
    async def work(request_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(async_task, request_id)
        background_tasks.add_task(sync_task, request_id)
        return {"request_id": request_id}

    def ours(span: ReadableSpan) -> bool:
        return span.resource is resource

    served = otel_bgtasks.instrument(app, tracer_provider=provider, meter_provider=meter_provider)
    try:
        # The SDK's export-failure records carry the exception, whose frames pin the span batch being exported.
        with records_not_retained("opentelemetry"), earlier_objects_frozen(), serving(served) as server:
            paths = [f"/work/{i}" for i in range(ENDPOINT_DOWN_REQUESTS)]
            warmup = await get_many(server.url, paths[:ENDPOINT_DOWN_WARMUP], ENDPOINT_DOWN_CONCURRENCY)
            rss_after_warmup = rss_bytes()
            rest = await get_many(server.url, paths[ENDPOINT_DOWN_WARMUP:], ENDPOINT_DOWN_CONCURRENCY)
            max_lag = lag.max  # before counting objects below, which holds the GIL for a while
            rss_growth = rss_bytes() - rss_after_warmup
            live_spans = live(ReadableSpan, ours)  # processors get (and queue) ReadableSpan copies
            server.stop()  # graceful: waits for every task
        exports_begun_while_serving = span_exporter.begun
        connections_while_serving = collector.accepted

        responses = warmup + rest
        wrong = [
            (i, status, body)
            for i, (status, body) in enumerate(responses)
            if (status, json.loads(body)) != (200, {"request_id": i})
        ]
        assert wrong == []
        assert countdown.done.is_set(), "some background tasks did not run"
        # The collector really was hung: spans were sent to it during the run, and it never answered.
        assert exports_begun_while_serving > 0, "no export was attempted while serving"
        assert connections_while_serving > 0, "no exporter reached the collector"
        # Nothing blocked the server's loop waiting for the exporter.
        assert lag.samples > 10
        assert max_lag < MAX_LOOP_LAG, f"the event loop stalled for {max_lag:.3f} s"
        # Memory: the SDK's bounded queue (plus the batch in flight) holds spans, otel_bgtasks holds none.
        # (queue + a batch being exported + the last failed export's traceback + requests in progress;
        # an unbounded queue would hold about 6000 by then)
        assert live_spans <= BSP_QUEUE + 2 * BSP_BATCH + 5 * ENDPOINT_DOWN_CONCURRENCY, live_spans
        assert rss_growth < MAX_RSS_GROWTH, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
        task_names = {f"{__name__}.{f.__qualname__}" for f in (async_task, sync_task)}
        assert live(TaskState, lambda state: state.names.function_name in task_names) == 0
        assert live(TaskRun, lambda run: run.names.function_name in task_names) == 0
    finally:
        # Stop the exporters first, so that neither retries nor flushes at shutdown; then hang up, which
        # fails the exports still waiting on the collector at once.
        span_exporter.shutdown()
        metric_exporter.shutdown()
        collector.hang_up()
        began = time.perf_counter()
        provider.shutdown()
        meter_provider.shutdown(timeout_millis=1000)
        shutdown_seconds = time.perf_counter() - began
    assert shutdown_seconds < 5, "shutting the providers down took too long"
    assert set(span_exporter.results) == {SpanExportResult.FAILURE}, "an export to the hung collector succeeded"


# -- 2. Many concurrent requests: each task keeps its own request ------------------------------------

CONCURRENT_REQUESTS = 500
TASKS_PER_REQUEST = 2
GROUP = 50  # first tasks wait for each other in groups of this many, all on the server loop at once
CONNECTIONS = 100  # a bounded pool of keep-alive connections (see _servers.get_many on why not httpx here)


@pytest.mark.parametrize("mode", ["child", "link"])
async def test_500_concurrent_requests_each_keep_their_own_tasks(
    mode: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    countdown = Countdown(CONCURRENT_REQUESTS * TASKS_PER_REQUEST)
    arrived = 0
    groups: dict[int, asyncio.Event] = {}
    waiting = max_waiting = 0

    async def first_task(request_id: int) -> None:
        nonlocal arrived, waiting, max_waiting
        tag_task_span(request_id)
        group = groups.setdefault(arrived // GROUP, asyncio.Event())
        arrived += 1
        if arrived % GROUP == 0:
            group.set()
        waiting += 1
        max_waiting = max(max_waiting, waiting)
        try:
            await asyncio.wait_for(group.wait(), WAIT_SECONDS)
        finally:
            waiting -= 1
        countdown.tick()

    def second_task(request_id: int) -> None:
        tag_task_span(request_id)
        countdown.tick()

    app = make_app()

    add_work_route(app, first_task, second_task)

    served = otel_bgtasks.instrument(app, tracer_provider=tracer_provider, mode=mode)
    with serving(served) as server:
        responses = await get_many(server.url, [f"/work/{i}" for i in range(CONCURRENT_REQUESTS)], CONNECTIONS)
        assert [(status, json.loads(body)) for status, body in responses] == [
            (200, {"request_id": i}) for i in range(CONCURRENT_REQUESTS)
        ]
        assert countdown.done.wait(WAIT_SECONDS), "the background tasks did not all run"
    assert max_waiting >= GROUP  # tasks of at least GROUP different requests were in flight together

    spans = {span.context.span_id: span for span in exporter.get_finished_spans()}
    servers = [s for s in spans.values() if s.kind is SpanKind.SERVER]
    assert len(servers) == CONCURRENT_REQUESTS
    tasks = task_spans(exporter)
    assert len(tasks) == CONCURRENT_REQUESTS * TASKS_PER_REQUEST

    def creator_of(task: ReadableSpan) -> ReadableSpan:
        if mode == "child":
            assert task.parent is not None
            creator = spans[task.parent.span_id]
            assert task.context.trace_id == creator.context.trace_id
            assert not task.links
        else:
            assert task.parent is None, "a link-mode task span must be a root"
            (link,) = task.links
            creator = spans[link.context.span_id]
            assert task.context.trace_id != creator.context.trace_id
        assert creator.kind is SpanKind.SERVER, creator.name
        return creator

    assert_each_request_keeps_its_tasks(tasks, CONCURRENT_REQUESTS, (first_task, second_task), creator_of)
    if mode == "link":  # every task its own trace
        assert len({t.context.trace_id for t in tasks}) == len(tasks)


# -- 3. Faults inside otel_bgtasks: the tasks and the request never notice -------------------------


class Declined(Exception):
    pass


def is_ours(event: Any) -> bool:
    """A Sentry event otel_bgtasks captured (its mechanism, as the README says)."""
    values = (event or {}).get("exception", {}).get("values", [])
    return any(value.get("mechanism", {}).get("type") == "otel_bgtasks" for value in values)


class TransportDown(Transport):
    """Sentry's transport failing on every event (sentry-sdk does not guard ``capture_envelope``)."""

    ours = 0

    def capture_envelope(self, envelope: Any) -> None:
        TransportDown.ours += is_ours(envelope.get_event())
        raise RuntimeError("sentry transport down")


class BeforeSendDown:
    """A ``before_send`` hook failing on every event (sentry-sdk guards it itself)."""

    def __init__(self) -> None:
        self.ours = 0

    def __call__(self, event: Any, hint: Any) -> Any:
        self.ours += is_ours(event)
        raise RuntimeError("before_send down")


class Scenario:
    """An app whose tasks record what they did, and whose failing tasks raise objects we keep."""

    OK_REQUESTS = 4
    FAIL_REQUESTS = 4  # even: an async task fails; odd: a sync one; the task queued after it is skipped

    def __init__(self) -> None:
        self.results: list[tuple[str, int]] = []
        self.raised: list[BaseException] = []
        self.app = app = make_app()

        async def ok_async(i: int) -> None:
            self.results.append(("async", i))

        def ok_sync(i: int) -> None:
            self.results.append(("sync", i))

        async def fail_async(i: int) -> None:
            error = Declined(f"async {i}")
            self.raised.append(error)
            raise error

        def fail_sync(i: int) -> None:
            error = Declined(f"sync {i}")
            self.raised.append(error)
            raise error

        def after_failure(i: int) -> None:
            self.results.append(("after failure", i))

        @app.get("/ok/{i}")
        async def ok(i: int, background_tasks: BackgroundTasks) -> dict[str, int]:
            background_tasks.add_task(ok_async, i)
            background_tasks.add_task(ok_sync, i)
            return {"ok": i}

        @app.get("/fail/{i}")
        async def fail(i: int, background_tasks: BackgroundTasks) -> dict[str, int]:
            background_tasks.add_task(fail_async if i % 2 == 0 else fail_sync, i)
            background_tasks.add_task(after_failure, i)
            return {"fail": i}

    async def run(self, app: Any) -> dict[str, Any]:
        """Serve ``app``, send every request, stop the server (every task done); what happened."""
        paths = [f"/ok/{i}" for i in range(self.OK_REQUESTS)] + [f"/fail/{i}" for i in range(self.FAIL_REQUESTS)]
        with serving(app) as server, recording("uvicorn.error", logging.WARNING) as uvicorn_log:
            # A fresh connection per request: uvicorn closes the connection of a request whose task failed.
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=WAIT_SECONDS) as client:
                responses = [await client.get(path) for path in paths]
            server.stop()
        reached = [r.exc_info[1] for r in uvicorn_log.records if r.exc_info and r.exc_info[1] is not None]
        # The very objects the tasks raised reached uvicorn, the app's caller (in any order: sync tasks
        # finish on worker threads).
        assert len(reached) == len(self.raised)
        assert {id(error) for error in reached} == {id(error) for error in self.raised}, (reached, self.raised)
        return {
            "responses": [(r.status_code, r.json()) for r in responses],
            "results": sorted(self.results),
            "reached uvicorn": sorted((type(e).__qualname__, str(e)) for e in reached),
        }


FAULTS = ["tracer", "meter", "sentry-transport", "sentry-before-send"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_faults_inside_otel_bgtasks_never_reach_tasks_or_requests(
    fault: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter, fresh_guard: None
) -> None:
    plain = Scenario()
    expected = await plain.run(plain.app)  # no instrumentation at all: what Starlette does by itself

    options: dict[str, Any] = {"tracer_provider": tracer_provider}
    if fault == "tracer":
        options["tracer_provider"] = TracerDownForOtelBgtasks(tracer_provider)
    elif fault == "meter":
        options["meter_provider"] = MeterDownForOtelBgtasks()
    hook: Any = None  # the failing Sentry hook; counts the otel_bgtasks events that reached it
    if fault == "sentry-transport":
        hook = TransportDown
        hook.ours = 0
        sentry_sdk.init(
            dsn=f"http://public@127.0.0.1:{closed_port()}/1", transport=hook, auto_enabling_integrations=False
        )
    elif fault == "sentry-before-send":
        hook = BeforeSendDown()
        sentry_sdk.init(
            dsn=f"http://public@127.0.0.1:{closed_port()}/1", before_send=hook, auto_enabling_integrations=False
        )
    faulty = Scenario()
    try:
        with recording("otel_bgtasks") as ours:
            got = await faulty.run(otel_bgtasks.instrument(faulty.app, **options))
            # A direct caller gets the same exception object back too.
            error = Declined("direct")

            async def raise_it() -> None:
                raise error

            with pytest.raises(Declined) as raised:
                await starlette_background.BackgroundTasks([starlette_background.BackgroundTask(raise_it)])()
            assert raised.value is error
    finally:
        if fault.startswith("sentry"):
            sentry_sdk.get_client().close(timeout=1)
            sentry_sdk.Scope.get_global_scope().set_client(None)  # off, as never initialised: see sentry_set_aside

    assert got == expected
    assert got["responses"] == [(200, {"ok": i}) for i in range(Scenario.OK_REQUESTS)] + [
        (200, {"fail": i}) for i in range(Scenario.FAIL_REQUESTS)
    ]
    places = internal_errors(ours.records)
    assert all(count == 1 for count in places.values()), places  # once per place, however many tasks
    if fault == "sentry-before-send":
        assert places == {}  # sentry-sdk absorbs a failing before_send itself
    else:
        assert len(places) == 1, places
        ((kind, filename, _),) = places
        # Raised by the injected fault (tests/_faults.py, or the Sentry fakes here), not by otel_bgtasks itself.
        assert kind == "RuntimeError" and filename in {_faults.__file__, __file__}
    if fault.startswith("sentry"):
        # The faulty hook really was reached, once per failure (the direct call's included).
        assert hook.ours == Scenario.FAIL_REQUESTS + 1
        # A Sentry outage leaves the spans and the failure log records as they are.
        failures = [
            s for s in task_spans(exporter) if s.attributes and s.attributes["background_task.outcome"] == "error"
        ]
        assert len(failures) == Scenario.FAIL_REQUESTS + 1
        assert all(s.status.status_code is StatusCode.ERROR for s in failures)
        logged = [r for r in ours.records if r.getMessage().startswith("Background task ") and "failed" in r.msg]
        assert len(logged) == Scenario.FAIL_REQUESTS + 1


async def test_broken_meter_does_not_lose_the_task_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, fresh_guard: None
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=MeterDownForOtelBgtasks())
    ran: list[str] = []

    async def task() -> None:
        ran.append("ran")

    await starlette_background.BackgroundTask(task)()

    assert ran == ["ran"]
    spans = task_spans(exporter)
    assert len(spans) == 1, "the task span was never ended, so never exported"
    assert spans[0].attributes is not None
    assert spans[0].attributes["background_task.outcome"] == "success"


async def test_broken_tracer_keeps_metrics_and_failure_log(tracer_provider: TracerProvider, fresh_guard: None) -> None:
    reader = InMemoryMetricReader()
    otel_bgtasks.instrument(
        tracer_provider=TracerDownForOtelBgtasks(tracer_provider), meter_provider=MeterProvider(metric_readers=[reader])
    )
    error = Declined("declined")

    async def fail() -> None:
        raise error

    def after() -> None:
        raise AssertionError("skipped by Starlette: never runs")

    tasks = starlette_background.BackgroundTasks(
        [starlette_background.BackgroundTask(fail), starlette_background.BackgroundTask(after)]
    )
    with recording("otel_bgtasks") as ours, pytest.raises(Declined) as raised:
        await tasks()

    assert raised.value is error
    failure_logs = [r for r in ours.records if r.getMessage().startswith("Background task ") and " failed " in r.msg]
    assert [r.exc_info[1] if r.exc_info else None for r in failure_logs] == [error]
    outcomes = {
        (str(attributes["code.function.name"]).rsplit(".", 1)[-1], attributes["background_task.outcome"]): value
        for attributes, value in point_values(reader, "background_task.outcomes")
    }
    assert outcomes == {("fail", "error"): 1, ("after", "skipped"): 1}


async def test_task_run_after_uninstrument_is_not_reported_dropped(tracer_provider: TracerProvider) -> None:
    ran: list[str] = []

    async def task() -> None:
        ran.append("ran")

    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    created = starlette_background.BackgroundTask(task)
    otel_bgtasks.uninstrument()
    with recording("otel_bgtasks") as ours:
        await created()
        del created
        gc.collect()

    assert ran == ["ran"]
    assert [r.getMessage() for r in ours.records if "was never run" in r.getMessage()] == []


# -- 4. instrument() and uninstrument() racing while requests flow -----------------------------------

FLIP_THREADS = 4
FLIPS = 50  # even
RACE_REQUESTS = 200
RACE_CONCURRENCY = 10


async def test_instrument_uninstrument_race_while_serving(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    runs: Counter[int] = Counter()
    runs_lock = threading.Lock()
    created = 0
    created_changed = threading.Condition()

    def ran(task_id: int) -> None:
        with runs_lock:
            runs[task_id] += 1

    async def async_task(task_id: int) -> None:
        ran(task_id)

    def sync_task(task_id: int) -> None:
        ran(task_id)

    app = make_app()

    @app.get("/race/{task_id}")
    async def race(task_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        nonlocal created
        background_tasks.add_task(async_task if task_id % 2 == 0 else sync_task, task_id)
        with created_changed:
            created += 1
            created_changed.notify_all()
        return {"task_id": task_id}

    errors: list[BaseException] = []
    start = threading.Barrier(FLIP_THREADS)

    def flipper() -> None:
        try:
            start.wait(WAIT_SECONDS)
            for flip in range(FLIPS):
                # Spread the flips over the whole stream of requests: flip n waits for request 4n, so that
                # tasks are created and run on both sides of a flip, about half of them instrumented.
                due = flip * RACE_REQUESTS // FLIPS
                with created_changed:
                    assert created_changed.wait_for(lambda due=due: created >= due, WAIT_SECONDS)
                if flip % 2 == 0:
                    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
                else:  # FLIPS is even: every thread ends with this
                    otel_bgtasks.uninstrument()
        except BaseException as exc:
            errors.append(exc)

    served = otel_bgtasks.instrument(app, tracer_provider=tracer_provider, capture_args=True)
    flippers = [threading.Thread(target=flipper, name=f"flipper-{n}") for n in range(FLIP_THREADS)]
    with serving(served) as server:
        for thread in flippers:
            thread.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_SECONDS) as client:
                responses = await get_all(client, [f"/race/{i}" for i in range(RACE_REQUESTS)], RACE_CONCURRENCY)
        finally:
            for thread in flippers:
                thread.join(WAIT_SECONDS)
        assert not any(thread.is_alive() for thread in flippers)
        server.stop()  # every task has run once this returns

    assert errors == []
    assert [(r.status_code, r.json()) for r in responses] == [(200, {"task_id": i}) for i in range(RACE_REQUESTS)]
    assert runs == dict.fromkeys(range(RACE_REQUESTS), 1), "a task did not run exactly once"
    # Each task was traced at most once: its unique argument appears on at most one span.
    spans_per_task = Counter(s.attributes["background_task.args"] for s in task_spans(exporter) if s.attributes)
    assert [args for args, count in spans_per_task.items() if count > 1] == []
    assert spans_per_task, "no task ran instrumented: the flips did not interleave with the requests"
    assert set(spans_per_task) <= {(repr(i),) for i in range(RACE_REQUESTS)}
    assert all(s.attributes and s.attributes["background_task.outcome"] == "success" for s in task_spans(exporter))

    # Every thread ended with uninstrument(): Starlette and FastAPI are exactly as they were.
    assert not otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    assert_originals_restored()


# -- 5. Graceful shutdown with a task still running ---------------------------------------------------

GRACEFUL_SHUTDOWN = 0.5


async def test_graceful_shutdown_cancels_running_task_and_its_span_is_exported() -> None:
    """uvicorn (0.54) waits ``timeout_graceful_shutdown`` for running tasks, then cancels them."""
    span_exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    started = threading.Event()
    finished = threading.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()  # never set
        finished.set()

    app = make_app()

    @app.get("/hang")
    async def hang(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(wait_forever)
        return {"queued": True}

    served = otel_bgtasks.instrument(app, tracer_provider=provider, meter_provider=meter_provider)
    try:
        with serving(served, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_SECONDS) as client:
                response = await client.get("/hang")
            assert response.json() == {"queued": True}
            assert started.wait(WAIT_SECONDS), "the task did not start"
            with recording("uvicorn.error", logging.WARNING) as uvicorn_log, recording("otel_bgtasks") as ours:
                began = time.perf_counter()
                server.stop()
                shutdown_seconds = time.perf_counter() - began
        assert not finished.is_set()
        assert GRACEFUL_SHUTDOWN <= shutdown_seconds < WAIT_SECONDS
        assert any(
            r.getMessage() == "Cancel 1 running task(s), timeout graceful shutdown exceeded"
            for r in uvicorn_log.records
        ), [r.getMessage() for r in uvicorn_log.records]
        # The BatchSpanProcessor exports on its schedule (5 s) or on a flush: the ended span must be in its queue.
        assert provider.force_flush(5000)
    finally:
        provider.shutdown()

    spans = {s.context.span_id: s for s in span_exporter.get_finished_spans()}
    (task,) = [s for s in spans.values() if s.name == f"BackgroundTask {wait_forever.__qualname__}"]
    assert task.attributes is not None
    assert task.attributes["background_task.outcome"] == "cancelled"
    assert task.status.status_code is not StatusCode.ERROR  # a shutdown is not the task's failure
    assert task.end_time is not None and task.start_time is not None
    assert (task.end_time - task.start_time) / 1e9 >= GRACEFUL_SHUTDOWN
    assert task.parent is not None
    assert spans[task.parent.span_id].kind is SpanKind.SERVER
    assert [r for r in ours.records if r.levelno >= logging.ERROR] == []
    active = [value for attributes, value in point_values(reader, "background_task.active")]
    assert active == [0]
    outcomes = {a["background_task.outcome"]: value for a, value in point_values(reader, "background_task.outcomes")}
    assert outcomes == {"cancelled": 1}


@pytest.mark.parametrize("continue_on_error", [False, True], ids=["default", "continue_on_error"])
async def test_shutdown_mid_list_shows_the_tasks_never_run_as_skipped(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, continue_on_error: bool
) -> None:
    """The first task is cancelled at the graceful-shutdown deadline: the ones after it never run."""
    started = threading.Event()
    ran: list[str] = []

    async def wait_for_payment() -> None:
        started.set()
        await asyncio.Event().wait()  # never set

    def send_receipt() -> None:
        ran.append("receipt")

    async def update_stats() -> None:
        ran.append("stats")

    app = make_app()

    @app.get("/checkout")
    async def checkout(background_tasks: BackgroundTasks) -> dict[str, int]:
        for task in (wait_for_payment, send_receipt, update_stats):
            background_tasks.add_task(task)
        return {"queued": 3}

    served = otel_bgtasks.instrument(app, tracer_provider=tracer_provider, continue_on_error=continue_on_error)
    with recording("otel_bgtasks") as ours, serving(served, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_SECONDS) as client:
            assert (await client.get("/checkout")).json() == {"queued": 3}
        assert started.wait(WAIT_SECONDS), "the first task did not start"
        server.stop()

    assert ran == []
    spans = {
        str(s.attributes["code.function.name"]).rsplit(".", 1)[-1]: (
            s.attributes["background_task.outcome"],
            s.attributes["background_task.index"],
        )
        for s in task_spans(exporter)
        if s.attributes
    }
    assert spans == {
        "wait_for_payment": ("cancelled", 0),
        "send_receipt": ("skipped", 1),
        "update_stats": ("skipped", 2),
    }
    (warning,) = [r.getMessage() for r in ours.records if r.levelno >= logging.WARNING]
    assert warning.startswith("Skipped 2 background task(s) because their BackgroundTasks was cancelled")
    assert "send_receipt" in warning and "update_stats" in warning
    assert "failed" not in warning
