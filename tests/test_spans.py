"""The span contract: one well-formed span per background task, tied to the span that queued it."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import httpx
import pytest
from _spans import ANY_DURATION, containing, span_as_dict
from conftest import WITHOUT_NATIVE_TELEMETRY, spans_named, task_spans
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks

tracer = trace.get_tracer("tests")


class PaymentDeclined(Exception):
    pass


def send_email(address: str) -> str:
    return address


async def refresh_cache() -> None:
    await asyncio.sleep(0)


async def charge_card() -> None:
    raise PaymentDeclined("card 4242 declined")


def notify_warehouse() -> None:
    raise AssertionError("must never run after charge_card failed")


class Mailer:
    def __call__(self, address: str) -> None:
        pass

    def send(self, address: str) -> None:
        pass


async def get(app: Any, path: str = "/") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


def fastapi_app(*tasks: tuple[Any, tuple[Any, ...]]) -> FastAPI:
    """An app whose route queues ``tasks``; ``app.state.creating`` collects the span current in the route.

    FastAPI's native telemetry (>= 0.163) is off here, so that ``instrument(app)`` adds the ASGI middleware
    and the creating span is its request span; tests/test_coexistence.py covers the native setups.
    """
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)
    app.state.creating = []

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        app.state.creating.append(trace.get_current_span().get_span_context().span_id)
        for func, args in tasks:
            background_tasks.add_task(func, *args)
        return {"ok": True}

    return app


def creating_span(exporter: InMemorySpanExporter, app: FastAPI) -> ReadableSpan:
    (span_id,) = app.state.creating
    (span,) = [s for s in exporter.get_finished_spans() if s.context.span_id == span_id]
    return span


def task_spans_as_dicts(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    finished = exporter.get_finished_spans()
    return [span_as_dict(span, finished) for span in task_spans(exporter)]


def code_of(func: Any) -> dict[str, Any]:
    """The ``code.*`` attributes of a task span: the function that ran and where it is defined."""
    return {
        "code.function.name": f"{__name__}.{func.__qualname__}",
        "code.file.path": __file__,
        "code.line.number": func.__code__.co_firstlineno,
    }


async def test_task_span_is_child_of_request_with_contract_attributes(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = otel_bgtasks.instrument(
        fastapi_app((send_email, ("a@example.com",)), (refresh_cache, ())), tracer_provider=tracer_provider
    )

    response = await get(app)

    assert response.json() == {"ok": True}
    request = creating_span(exporter, app)
    assert request.name == "GET /"
    assert task_spans_as_dicts(exporter) == [
        {
            "name": "BackgroundTask send_email",
            "kind": SpanKind.INTERNAL,
            "parent": "GET /",
            "links": [],
            "status": (StatusCode.UNSET, None),
            "attributes": {
                "code.function.name": f"{__name__}.send_email",
                "code.file.path": __file__,
                "code.line.number": send_email.__code__.co_firstlineno,
                "background_task.execution": "threadpool",
                "background_task.index": 0,
                "background_task.queue.duration": ANY_DURATION,
                "background_task.threadpool.wait": ANY_DURATION,
                "background_task.outcome": "success",
            },
            "events": [],
        },
        {
            "name": "BackgroundTask refresh_cache",
            "kind": SpanKind.INTERNAL,
            "parent": "GET /",
            "links": [],
            "status": (StatusCode.UNSET, None),
            "attributes": {
                "code.function.name": f"{__name__}.refresh_cache",
                "code.file.path": __file__,
                "code.line.number": refresh_cache.__code__.co_firstlineno,
                "background_task.execution": "async",
                "background_task.index": 1,
                "background_task.queue.duration": ANY_DURATION,
                "background_task.blocking.max": ANY_DURATION,
                "background_task.outcome": "success",
            },
            "events": [],
        },
    ]
    # Child mode: the task spans' parent and queue delay say who queued them and when; no event needed.
    assert [e.name for e in request.events if e.name.startswith("background_task.")] == []


async def test_failure_is_recorded_and_following_tasks_are_shown_skipped(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = otel_bgtasks.instrument(
        fastapi_app((charge_card, ()), (notify_warehouse, ()), (send_email, ("x",))), tracer_provider=tracer_provider
    )

    response = await get(app)

    assert response.status_code == 200  # the response was sent before the task failed
    assert creating_span(exporter, app).name == "GET /"
    assert task_spans_as_dicts(exporter) == [
        {
            "name": "BackgroundTask charge_card",
            "kind": SpanKind.INTERNAL,
            "parent": "GET /",
            "links": [],
            "status": (StatusCode.ERROR, "card 4242 declined"),
            "attributes": {
                **code_of(charge_card),
                "background_task.execution": "async",
                "background_task.index": 0,
                "background_task.queue.duration": ANY_DURATION,
                "background_task.blocking.max": ANY_DURATION,
                "background_task.outcome": "error",
                "error.type": f"{__name__}.PaymentDeclined",
            },
            "events": [
                {
                    "name": "exception",
                    "attributes": {
                        "exception.type": f"{__name__}.PaymentDeclined",
                        "exception.message": "card 4242 declined",
                        "exception.stacktrace": containing(", in charge_card\n"),
                        "exception.escaped": "True",
                    },
                }
            ],
        },
        # The tasks after it never ran: no queue delay, no execution measurements, a zero-length span.
        {
            "name": "BackgroundTask notify_warehouse",
            "kind": SpanKind.INTERNAL,
            "parent": "GET /",
            "links": [],
            "status": (StatusCode.UNSET, None),
            "attributes": {
                **code_of(notify_warehouse),
                "background_task.execution": "threadpool",
                "background_task.index": 1,
                "background_task.outcome": "skipped",
            },
            "events": [],
        },
        {
            "name": "BackgroundTask send_email",
            "kind": SpanKind.INTERNAL,
            "parent": "GET /",
            "links": [],
            "status": (StatusCode.UNSET, None),
            "attributes": {
                **code_of(send_email),
                "background_task.execution": "threadpool",
                "background_task.index": 2,
                "background_task.outcome": "skipped",
            },
            "events": [],
        },
    ]
    _, *skipped = task_spans(exporter)
    assert [span.end_time for span in skipped] == [span.start_time for span in skipped]


async def test_builtin_error_type_is_bare() -> None:
    exc = KeyError("k")
    from otel_bgtasks.naming import error_type

    assert error_type(exc) == "KeyError"
    assert error_type(PaymentDeclined()) == f"{__name__}.PaymentDeclined"


async def test_real_exception_recorded_when_app_handles_its_type(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Starlette reports "Caught handled exception, but response already started"; the task span keeps the truth."""

    async def handler(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("handled", status_code=402)

    app = fastapi_app((charge_card, ()))
    app.add_exception_handler(PaymentDeclined, handler)
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)

    await get(app)

    (charge,) = task_spans(exporter)
    assert charge.attributes is not None
    assert charge.attributes["error.type"] == f"{__name__}.PaymentDeclined"
    assert charge.status.description == "card 4242 declined"


async def test_starlette_response_background_and_task_list(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def single(request: Request) -> Response:
        return JSONResponse({"a": 1}, background=BackgroundTask(send_email, "single"))

    async def several(request: Request) -> Response:
        tasks = StarletteBackgroundTasks([BackgroundTask(refresh_cache), BackgroundTask(send_email, "b")])
        return JSONResponse({"b": 2}, background=tasks)

    app = Starlette(routes=[Route("/single", single), Route("/several", several)])
    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)

    assert (await get(app, "/single")).json() == {"a": 1}
    assert (await get(app, "/several")).json() == {"b": 2}

    single_request, several_request = spans_named(exporter, "GET /single") + spans_named(exporter, "GET /several")
    lone, cache, email = task_spans(exporter)
    assert lone.parent is not None and lone.parent.span_id == single_request.context.span_id
    assert lone.attributes is not None and "background_task.index" not in lone.attributes
    assert [cache.name, email.name] == ["BackgroundTask refresh_cache", "BackgroundTask send_email"]
    for span, index in ((cache, 0), (email, 1)):
        assert span.parent is not None and span.parent.span_id == several_request.context.span_id
        assert span.attributes is not None and span.attributes["background_task.index"] == index


async def test_parent_is_the_span_current_at_creation(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = FastAPI()

    @app.get("/")
    def sync_route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        # A sync route runs in a worker thread; its span never reaches the event loop's context.
        with tracer.start_as_current_span("prepare export"):
            background_tasks.add_task(send_email, "x")
        return {"ok": True}

    otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    await get(app)

    (prepare,) = spans_named(exporter, "prepare export")
    (task,) = task_spans(exporter)
    assert task.parent is not None and task.parent.span_id == prepare.context.span_id
    assert [e.name for e in prepare.events] == []


@pytest.mark.parametrize(
    ("func", "name", "function_name"),
    [
        (functools.partial(send_email, "p"), "BackgroundTask send_email", f"{__name__}.send_email"),
        (Mailer(), "BackgroundTask Mailer", f"{__name__}.Mailer"),
        (Mailer().send, "BackgroundTask Mailer.send", f"{__name__}.Mailer.send"),
        (lambda: None, "BackgroundTask <lambda>", f"{__name__}.<lambda>"),
    ],
    ids=["partial", "callable-object", "bound-method", "lambda"],
)
async def test_span_names_for_every_kind_of_callable(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, func: Any, name: str, function_name: str
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    args = () if isinstance(func, functools.partial) or getattr(func, "__name__", "") == "<lambda>" else ("a",)

    await BackgroundTask(func, *args)()

    (span,) = task_spans(exporter)
    assert span.name == name
    assert span.attributes is not None and span.attributes["code.function.name"] == function_name


async def test_link_mode_starts_a_new_trace_linked_to_the_request(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = otel_bgtasks.instrument(fastapi_app((send_email, ("x",))), tracer_provider=tracer_provider, mode="link")

    await get(app)

    request = creating_span(exporter, app)
    (task,) = task_spans(exporter)
    finished = exporter.get_finished_spans()
    assert span_as_dict(task, finished) == {
        "name": "BackgroundTask send_email",
        "kind": SpanKind.INTERNAL,
        "parent": None,
        "links": ["GET /"],
        "status": (StatusCode.UNSET, None),
        "attributes": {
            **code_of(send_email),
            "background_task.execution": "threadpool",
            "background_task.index": 0,
            "background_task.queue.duration": ANY_DURATION,
            "background_task.threadpool.wait": ANY_DURATION,
            "background_task.outcome": "success",
        },
        "events": [],
    }
    assert task.context.trace_id != request.context.trace_id
    # The request span ended with the response, before the task ran: its trace keeps the enqueued event.
    assert span_as_dict(request, finished)["links"] == []
    assert span_as_dict(request, finished)["events"] == [
        {"name": "background_task.enqueued", "attributes": {"code.function.name": f"{__name__}.send_email"}}
    ]


async def test_link_mode_links_back_from_a_creating_span_still_open(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, mode="link")

    with tracer.start_as_current_span("nightly job"):
        await BackgroundTask(send_email, "x")()

    (job,) = spans_named(exporter, "nightly job")
    (task,) = task_spans(exporter)
    assert [link.context.span_id for link in job.links] == [task.context.span_id]
    assert [link.context.span_id for link in task.links] == [job.context.span_id]
    assert task.parent is None


async def test_link_mode_skipped_tasks_are_linked_roots(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = otel_bgtasks.instrument(
        fastapi_app((charge_card, ()), (notify_warehouse, ())), tracer_provider=tracer_provider, mode="link"
    )
    await get(app)

    assert creating_span(exporter, app).name == "GET /"
    _, skipped = task_spans_as_dicts(exporter)
    assert skipped == {
        "name": "BackgroundTask notify_warehouse",
        "kind": SpanKind.INTERNAL,
        "parent": None,
        "links": ["GET /"],
        "status": (StatusCode.UNSET, None),
        "attributes": {
            **code_of(notify_warehouse),
            "background_task.execution": "threadpool",
            "background_task.index": 1,
            "background_task.outcome": "skipped",
        },
        "events": [],
    }


async def test_unsampled_request_records_nothing_and_task_still_runs(exporter: InMemorySpanExporter) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    ran: list[str] = []
    otel_bgtasks.instrument(tracer_provider=unsampled)

    await BackgroundTask(ran.append, "yes")()

    assert ran == ["yes"]
    assert exporter.get_finished_spans() == ()


async def test_cancelled_task_is_ended_with_outcome_cancelled(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    started = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    running = asyncio.ensure_future(BackgroundTask(wait_forever)())
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    (span,) = task_spans(exporter)
    assert span.attributes is not None and span.attributes["background_task.outcome"] == "cancelled"
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time is not None


async def test_task_exception_is_the_same_object_and_context_is_restored(tracer_provider: TracerProvider) -> None:
    failure = PaymentDeclined("same one")

    async def fail() -> None:
        raise failure

    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    before = trace.get_current_span()
    with pytest.raises(PaymentDeclined) as caught:
        await BackgroundTask(fail)()
    assert caught.value is failure
    assert trace.get_current_span() is before


@pytest.mark.parametrize("blocking_threshold", [0.1, None], ids=["event_loop_timed", "untimed"])
async def test_context_is_restored_after_a_task_that_succeeds(
    tracer_provider: TracerProvider, blocking_threshold: float | None
) -> None:
    async def async_task() -> None:
        pass

    otel_bgtasks.instrument(tracer_provider=tracer_provider, blocking_threshold=blocking_threshold)
    with tracer_provider.get_tracer("tests").start_as_current_span("route") as route:
        await BackgroundTask(async_task)()
        assert trace.get_current_span() is route
        await BackgroundTask(send_email, "ann")()
        assert trace.get_current_span() is route
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("blocking_threshold", [0.1, None], ids=["event_loop_timed", "untimed"])
async def test_a_task_closed_while_it_waits_runs_its_finally_in_its_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, blocking_threshold: float | None
) -> None:
    """``close()`` of the awaiting coroutine (a suspended one dropped) reaches the task, as uninstrumented."""
    seen: list[object] = []

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            seen.append(trace.get_current_span().get_span_context().span_id)

    otel_bgtasks.instrument(tracer_provider=tracer_provider, blocking_threshold=blocking_threshold)
    awaiting = BackgroundTask(waits)()
    awaiting.send(None)
    awaiting.close()
    seen.append("closed")

    (span,) = task_spans(exporter)
    assert seen == [span.context.span_id, "closed"]


async def test_task_sees_its_own_span_as_current(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    seen: list[int] = []

    def sync_task() -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    async def async_task() -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await StarletteBackgroundTasks([BackgroundTask(sync_task), BackgroundTask(async_task)])()

    assert seen == [span.context.span_id for span in task_spans(exporter)]


async def test_task_created_before_instrument_still_gets_a_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    task = BackgroundTask(send_email, "early")
    otel_bgtasks.instrument(tracer_provider=tracer_provider)

    await task()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert "background_task.queue.duration" not in span.attributes
    assert span.attributes["background_task.outcome"] == "success"
