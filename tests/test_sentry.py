"""Sentry forwarding with the real sentry-sdk, sending envelopes over HTTP to a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any

import anyio.to_thread
import httpx
import pytest
import sentry_sdk
from _sentry_endpoint import SentryEndpoint, init_sentry
from _servers import records_not_retained
from conftest import sentry_set_aside, task_spans
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

import otel_bgtasks


class CardDeclined(Exception):
    pass


def charge_sync(card: str, password: str) -> None:
    raise CardDeclined(f"card {card[-4:]} declined")


async def charge_async(card: str, password: str) -> None:
    raise CardDeclined(f"card {card[-4:]} declined")


def notify(order: int) -> None:
    raise AssertionError("skipped: never runs")


@pytest.fixture(autouse=True)
def _sentry_off_around() -> Iterator[None]:
    """Each test starts with Sentry off and leaves the client it found (``sentry_sdk.init()`` is no inactive client)."""
    with sentry_set_aside():
        yield


def app_with(*tasks: tuple[Any, tuple[Any, ...]], handler: bool = False) -> FastAPI:
    app = FastAPI()

    @app.post("/orders/{order}")
    async def place_order(order: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        for func, args in tasks:
            background_tasks.add_task(func, *args)
        return {"order": order}

    if handler:

        async def declined(request: Request, exc: Exception) -> Response:
            return PlainTextResponse("declined", status_code=402)

        app.add_exception_handler(CardDeclined, declined)
    return app


async def post(app: Any, path: str = "/orders/7") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post(path)


CARD = ("4000000000000002", "hunter2")


@pytest.mark.parametrize("framework_integrations", [False, True], ids=["sentry-alone", "sentry-starlette-fastapi"])
@pytest.mark.parametrize("task", [charge_sync, charge_async], ids=["sync", "async"])
async def test_one_event_per_failure_tied_to_the_trace(
    receiver: SentryEndpoint,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    framework_integrations: bool,
    task: Any,
) -> None:
    init_sentry(receiver.dsn, framework_integrations=framework_integrations)
    app = otel_bgtasks.instrument(app_with((task, CARD), (notify, (7,))), tracer_provider=tracer_provider)

    response = await post(app)
    sentry_sdk.flush(timeout=5)

    assert response.json() == {"order": 7}
    (event,) = receiver.events
    span = next(s for s in task_spans(exporter) if s.name == f"BackgroundTask {task.__qualname__}")
    assert event["tags"]["background_task"] == task.__qualname__
    assert event["tags"]["background_task.outcome"] == "error"
    assert event["tags"]["otel.trace_id"] == trace.format_trace_id(span.context.trace_id)
    assert event["tags"]["otel.span_id"] == trace.format_span_id(span.context.span_id)
    assert event["transaction"] == f"BackgroundTask {task.__qualname__}"
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "CardDeclined"
    assert exception["value"] == "card 0002 declined"
    assert exception["mechanism"]["type"] == "otel_bgtasks"
    assert exception["mechanism"]["handled"] is False
    context = event["contexts"]["background_task"]
    assert context["function"] == f"{__name__}.{task.__qualname__}"
    assert context["execution"] == ("async" if task is charge_async else "threadpool")
    assert context["queue_delay"] >= 0
    assert "args" not in context and "kwargs" not in context
    skipped = [b for b in event["breadcrumbs"]["values"] if b.get("category") == "background_task"]
    assert [b["data"]["code.function.name"] for b in skipped] == [f"{__name__}.notify"]
    if framework_integrations:
        assert event["tags"]["http.route"] == "/orders/{order}"
    body = json.dumps(event)
    assert "4000000000000002" not in body and "hunter2" not in body  # no arguments, no frame locals


async def test_handled_exception_type_still_one_event(
    receiver: SentryEndpoint, tracer_provider: TracerProvider
) -> None:
    """Starlette re-raises it as "Caught handled exception, but response already started"."""
    init_sentry(receiver.dsn, framework_integrations=True)
    app = otel_bgtasks.instrument(app_with((charge_async, CARD), handler=True), tracer_provider=tracer_provider)

    await post(app)
    sentry_sdk.flush(timeout=5)

    (event,) = receiver.events
    assert event["exception"]["values"][-1]["type"] == "CardDeclined"


@pytest.mark.filterwarnings("ignore:The send_default_pii option is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("pii", "sent"), [(True, True), (False, False)])
async def test_arguments_only_with_capture_args_and_send_default_pii(
    receiver: SentryEndpoint, tracer_provider: TracerProvider, exporter: InMemorySpanExporter, pii: bool, sent: bool
) -> None:
    init_sentry(receiver.dsn, framework_integrations=False, send_default_pii=pii)
    app = otel_bgtasks.instrument(app_with((charge_sync, CARD)), tracer_provider=tracer_provider, capture_args=True)

    await post(app)
    sentry_sdk.flush(timeout=5)

    (event,) = receiver.events
    context = event["contexts"]["background_task"]
    if sent:
        assert context["args"] == ["'4000000000000002'", "[redacted]"]
    else:
        assert "args" not in context
    assert "hunter2" not in json.dumps(event)
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == ("'4000000000000002'", "[redacted]")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_endpoint_down_never_affects_task_or_request(tracer_provider: TracerProvider) -> None:
    sentry_sdk.init(dsn=f"http://public@127.0.0.1:{closed_port()}/1", auto_enabling_integrations=False)
    ran: list[int] = []
    app = otel_bgtasks.instrument(app_with((charge_sync, CARD), (ran.append, (1,))), tracer_provider=tracer_provider)
    app2 = otel_bgtasks.instrument(app_with((ran.append, (2,))), tracer_provider=tracer_provider)
    assert (await post(app)).json() == {"order": 7}
    assert (await post(app2)).json() == {"order": 7}
    sentry_sdk.flush(timeout=2)
    assert ran == [2]  # the second task of the first request was skipped by Starlette, as without Sentry


async def test_no_dsn_and_sentry_false_send_nothing(receiver: SentryEndpoint, tracer_provider: TracerProvider) -> None:
    sentry_sdk.init()  # no DSN: an inactive client
    app = otel_bgtasks.instrument(app_with((charge_sync, CARD)), tracer_provider=tracer_provider)
    assert (await post(app)).status_code == 200
    otel_bgtasks.uninstrument()

    init_sentry(receiver.dsn, framework_integrations=False)
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider, sentry=False)
    await post(app)
    sentry_sdk.flush(timeout=5)
    # With forwarding off, Sentry still sees the failure through its own means (the ERROR log record),
    # but never with our task tags.
    assert all("background_task" not in event.get("tags", {}) for event in receiver.events)


def test_auto_mode_never_imports_sentry_sdk_itself() -> None:
    """Importing sentry_sdk on the first failure would stall the event loop for nothing: the app does not use it."""
    script = """
import asyncio, logging, sys
logging.disable(logging.CRITICAL)
import otel_bgtasks
from starlette.background import BackgroundTask
otel_bgtasks.instrument()

async def boom():
    raise RuntimeError("boom")

try:
    asyncio.run(BackgroundTask(boom)())
except RuntimeError:
    pass
print("sentry_sdk" in sys.modules)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert completed.stdout.strip() == "False"


def lookup(key: str) -> None:
    raise KeyError(key)  # a builtin exception: it cannot be weakly referenced


async def test_builtin_exception_is_one_event_too(receiver: SentryEndpoint, tracer_provider: TracerProvider) -> None:
    init_sentry(receiver.dsn, framework_integrations=True)
    app = otel_bgtasks.instrument(app_with((lookup, ("sku-1",))), tracer_provider=tracer_provider)

    await post(app)
    sentry_sdk.flush(timeout=5)

    (event,) = receiver.events
    assert event["exception"]["values"][-1]["type"] == "KeyError"
    assert event["tags"]["background_task"] == "lookup"


@pytest.mark.parametrize("asked", ["argument", "environment"])
async def test_sentry_true_forwards_exactly_one_event_per_failure(
    receiver: SentryEndpoint,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    asked: str,
) -> None:
    init_sentry(receiver.dsn, framework_integrations=True)
    if asked == "environment":
        monkeypatch.setenv("OTEL_PYTHON_BGTASKS_SENTRY", "true")
        app = otel_bgtasks.instrument(app_with((charge_async, CARD)), tracer_provider=tracer_provider)
    else:
        app = otel_bgtasks.instrument(app_with((charge_async, CARD)), tracer_provider=tracer_provider, sentry=True)

    for order in (7, 8, 9):
        assert (await post(app, f"/orders/{order}")).json() == {"order": order}
    sentry_sdk.flush(timeout=5)

    spans = task_spans(exporter)
    assert len(spans) == 3 and len(receiver.events) == 3
    assert sorted(event["tags"]["otel.span_id"] for event in receiver.events) == sorted(
        trace.format_span_id(span.context.span_id) for span in spans
    )
    for event in receiver.events:
        assert event["tags"]["background_task"] == "charge_async"
        (exception,) = event["exception"]["values"]
        assert (exception["type"], exception["mechanism"]["type"]) == ("CardDeclined", "otel_bgtasks")


# -- Off the happy path: memory, and a sync task's timeout inside BackgroundTasks -----------------


class Held:
    """An object that only the failed task's frame refers to."""


class OutOfStock(Exception):
    pass


def forget_the_last_job() -> None:
    """Run on an idle anyio worker thread: let go of what its previous job left behind.

    anyio 3's worker keeps its last job (its future, its exception) among the local variables of its loop
    until the next job, and anything that once read them (Sentry's logging integration walks the frames
    of the failure record's traceback) keeps a copy. Reading them again, now, refreshes that copy.
    """
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        frame.f_locals  # noqa: B018  # the read is the point
        frame = frame.f_back


@pytest.mark.parametrize("builtin", [False, True], ids=["own-exception", "builtin-exception"])
@pytest.mark.parametrize("initialised", [False, True], ids=["sentry-imported-only", "sentry-initialised"])
@pytest.mark.parametrize("kind", ["def", "async def"])
async def test_failed_task_exception_and_its_frames_are_freed(
    receiver: SentryEndpoint,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    initialised: bool,
    kind: str,
    builtin: bool,
) -> None:
    """Nothing otel_bgtasks keeps (the Sentry forwarder included) holds a failure once it is reported.

    A builtin exception cannot be weakly referenced: only its frame's object is watched. Sentry's
    DedupeIntegration keeps it by a strong reference, in the request's context, which goes with the request.
    """
    if initialised:
        init_sentry(receiver.dsn, framework_integrations=True)
    alive: list[weakref.ref[object]] = []

    def reserve_stock() -> None:
        held = Held()
        error = LookupError("sku-1") if builtin else OutOfStock("sku-1")
        alive.append(weakref.ref(held))
        if not builtin:
            alive.append(weakref.ref(error))
        raise error

    async def reserve_stock_async() -> None:
        reserve_stock()

    task = reserve_stock if kind == "def" else reserve_stock_async
    app = otel_bgtasks.instrument(app_with((task, ())), tracer_provider=tracer_provider)
    with records_not_retained("otel_bgtasks"):  # pytest's log capture would keep the failure record
        # In a task of its own, as a server runs each request: context variables set while serving it
        # (sentry-sdk 2.0's DedupeIntegration keeps the last exception it saw in one) go with it.
        await asyncio.create_task(post(app))
    sentry_sdk.flush(timeout=5)

    (span,) = task_spans(exporter)
    assert span.end_time is not None and span.attributes is not None
    assert span.attributes["background_task.outcome"] == "error"
    assert len(receiver.events) == (1 if initialised else 0)
    await anyio.to_thread.run_sync(forget_the_last_job)
    gc.collect()
    assert len(alive) == (1 if builtin else 2)
    assert [ref() for ref in alive] == [None] * len(alive), "the failed task's exception or its frames are still alive"


async def test_sync_timeout_inside_background_tasks_is_one_event(
    receiver: SentryEndpoint, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """FastAPI's normal case: ``add_task`` in a route, and the ``def`` task overruns its timeout."""
    init_sentry(receiver.dsn, framework_integrations=True)

    @otel_bgtasks.task_options(timeout=0.01)
    def export_report() -> None:
        time.sleep(0.05)  # the overrun itself, not synchronisation

    app = otel_bgtasks.instrument(app_with((export_report, ())), tracer_provider=tracer_provider)
    response = await post(app)
    sentry_sdk.flush(timeout=5)

    assert response.json() == {"order": 7}
    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.outcome"] == "timeout"
    (event,) = receiver.events
    assert event["tags"]["background_task.outcome"] == "timeout"
    assert event["contexts"]["background_task"]["outcome"] == "timeout"
    assert event["tags"]["otel.span_id"] == trace.format_span_id(span.context.span_id)
    assert event["exception"]["values"][-1]["type"] == "TimeoutError"
    assert "over its 0.01 s timeout" in event["exception"]["values"][-1]["value"]
