"""One Sentry event per task failure, and every other event the app would have sent without otel_bgtasks.

Each case runs the same app served by a real uvicorn on 127.0.0.1 twice, Sentry initialised both times
(events sent over HTTP to a receiver on 127.0.0.1): uninstrumented, then instrumented. The server is
stopped gracefully before counting, so every background task has run and every event has been sent.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sentry_sdk
import starlette
from _servers import serving, taken_for_a_factory
from conftest import sentry_set_aside
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from test_sentry import EnvelopeReceiver, init_sentry

import otel_bgtasks
from otel_bgtasks import sentry

OLD_STARLETTE = int(starlette.__version__.split(".")[0]) < 1


class CardDeclined(Exception):
    pass


class AuditError(Exception):
    pass


class CleanupFailed(Exception):
    pass


async def notify_followers(user: int) -> None:
    raise AssertionError("never runs: a coroutine object is not a task")


def charge(card: str) -> None:
    raise CardDeclined(f"card {card[-4:]} declined")


@pytest.fixture
def receiver() -> Iterator[EnvelopeReceiver]:
    with sentry_set_aside():  # Sentry off to start with, the client found put back after
        receiver = EnvelopeReceiver()
        yield receiver
        receiver.close()


def starlette_app(queue: Callable[[BackgroundTasks], None], *, handled: type[Exception] | None = None) -> Starlette:
    """One route that queues tasks; optionally an exception handler for ``handled``."""

    async def place_order(request: Request) -> JSONResponse:
        tasks = BackgroundTasks()
        queue(tasks)
        return JSONResponse({"order": 7}, background=tasks)

    async def handle(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("declined", status_code=402)

    return Starlette(
        routes=[Route("/orders/7", place_order, methods=["POST"])],
        exception_handlers={handled: handle} if handled is not None else {},
    )


def events_of(
    receiver: EnvelopeReceiver,
    app: ASGIApp,
    tracer_provider: TracerProvider,
    *,
    instrumented: bool,
    framework_integrations: bool,
) -> list[dict[str, Any]]:
    """The Sentry events one request to ``app`` sends, served by uvicorn, with or without otel_bgtasks."""
    receiver.events.clear()
    init_sentry(receiver.dsn, framework_integrations=framework_integrations)
    if instrumented:
        otel_bgtasks.instrument(tracer_provider=tracer_provider)
    try:
        with serving(app) as server:
            response = httpx.post(f"{server.url}/orders/7", timeout=10)
            assert response.status_code == 200
            assert response.json() == {"order": 7}
        sentry_sdk.flush(timeout=5)
    finally:
        otel_bgtasks.uninstrument()
    return list(receiver.events)


def exception_types(event: dict[str, Any]) -> list[str]:
    return [value["type"] for value in event["exception"]["values"]]


both_integrations = pytest.mark.parametrize(
    "framework_integrations", [False, True], ids=["sentry-alone", "sentry-starlette"]
)


@both_integrations
def test_coroutine_object_task_is_one_event(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider, framework_integrations: bool
) -> None:
    """``add_task(notify_followers(7))``: the ERROR said at ``add_task`` is not an event of its own."""
    made: list[Any] = []

    def queue(tasks: BackgroundTasks) -> None:
        made.append(notify_followers(7))
        tasks.add_task(made[-1])

    app = starlette_app(queue)
    bare = events_of(receiver, app, tracer_provider, instrumented=False, framework_integrations=framework_integrations)
    ours = events_of(receiver, app, tracer_provider, instrumented=True, framework_integrations=framework_integrations)
    for coroutine in made:  # uninstrumented, nobody closes it: Python would warn "never awaited" at some later GC
        coroutine.close()

    (bare_event,) = bare
    assert exception_types(bare_event)[-1] == "TypeError"
    (event,) = ours
    assert exception_types(event)[-1] == "TypeError"
    assert event["exception"]["values"][-1]["mechanism"]["type"] == "otel_bgtasks"
    assert event["tags"]["background_task"] == "notify_followers"
    assert event["tags"]["background_task.diagnosis"] == "add_task_misuse"


def test_uvicorn_detects_the_same_app_with_sentrys_starlette_integration(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider
) -> None:
    """What uvicorn's factory detection gets (the app called with no arguments) is the same with otel_bgtasks.

    With sentry-sdk 2.0.0's Starlette integration it is not the ``TypeError`` uvicorn expects but a coroutine
    (getsentry/sentry-python#3021, fixed in 2.0.1): uvicorn takes the app for a factory and answers every
    request 500, in both arms. Sentry's defect, not ours: tests/_servers.py gives uvicorn a function there, as
    that release's users must, so that the other tests here see what Sentry and otel_bgtasks send.
    """
    app = starlette_app(lambda tasks: tasks.add_task(charge, "4000000000000002"))

    def detected(instrumented: bool) -> str:
        init_sentry(receiver.dsn, framework_integrations=True)
        if instrumented:
            otel_bgtasks.instrument(tracer_provider=tracer_provider)
        try:
            returned = app()  # type: ignore[call-arg]
        except TypeError:
            return "TypeError"
        finally:
            otel_bgtasks.uninstrument()
        returned.close()
        return type(returned).__name__

    bare = detected(instrumented=False)
    assert detected(instrumented=True) == bare == ("coroutine" if taken_for_a_factory(app) else "TypeError")
    assert taken_for_a_factory(app) == (sentry_sdk.VERSION == "2.0.0")


class Translating:
    """An outer middleware that turns a failure into an error of the app's own, in one of three ways."""

    def __init__(self, app: ASGIApp, how: str) -> None:
        self.app = app
        self.how = how

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except CardDeclined as exc:
            if self.how == "from None":
                raise AuditError("payment audit failed") from None
            if self.how == "from exc":
                raise AuditError("payment audit failed") from exc
            raise CleanupFailed("could not release the card hold")  # noqa: B904  # a cleanup that fails in except


@both_integrations
@pytest.mark.parametrize("how", ["from None", "from exc", "cleanup in except"])
def test_app_error_raised_while_a_failure_propagates_reaches_sentry(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider, framework_integrations: bool, how: str
) -> None:
    """The app's own error whose chain holds the forwarded one is reported, as uninstrumented."""
    app = Translating(starlette_app(lambda tasks: tasks.add_task(charge, "4000000000000002")), how)
    bare = events_of(receiver, app, tracer_provider, instrumented=False, framework_integrations=framework_integrations)
    ours = events_of(receiver, app, tracer_provider, instrumented=True, framework_integrations=framework_integrations)

    app_error = "CleanupFailed" if how == "cleanup in except" else "AuditError"
    # Uninstrumented: the app's error, and with Sentry's Starlette integration the task's failure as well.
    bare_types = [exception_types(e) for e in bare]
    expected = ["CardDeclined", app_error] if framework_integrations else [app_error]
    assert [types[-1] for types in bare_types] == expected
    # Instrumented: the same app error, and the task's failure, forwarded, once.
    (failure,) = [e for e in ours if "background_task" in e.get("tags", {})]
    assert exception_types(failure) == ["CardDeclined"]
    assert failure["tags"]["background_task"] == "charge"
    app_errors = [exception_types(e) for e in ours if e is not failure]
    assert app_errors == [types for types in bare_types if types[-1] == app_error]


class Outer:
    """A plain ASGI middleware around a Starlette app served by uvicorn.

    uvicorn calls the app with no arguments to detect a factory; sentry-sdk 2.0's ``Starlette.__call__``
    patch takes any arguments and returns a coroutine instead of raising TypeError, so a bare Starlette
    app fails to start on uvicorn 0.23 once Sentry's Starlette integration was set up (uninstrumented too).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@both_integrations
def test_failure_in_a_nested_background_tasks_is_one_event(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider, framework_integrations: bool
) -> None:
    """A BackgroundTasks queued as a task of another: its failing task's exception fails the outer task too."""

    def queue(tasks: BackgroundTasks) -> None:
        inner = BackgroundTasks()
        inner.add_task(int)
        inner.add_task(charge, "4000000000000002")
        tasks.add_task(inner)

    app = Outer(starlette_app(queue))
    bare = events_of(receiver, app, tracer_provider, instrumented=False, framework_integrations=framework_integrations)
    ours = events_of(receiver, app, tracer_provider, instrumented=True, framework_integrations=framework_integrations)

    assert [exception_types(e) for e in bare] == [["CardDeclined"]]
    (event,) = ours  # the task that failed, not the BackgroundTasks that ran it
    assert exception_types(event) == ["CardDeclined"]
    assert event["tags"]["background_task"] == "charge"
    assert event["transaction"] == "BackgroundTask charge"


async def _passing(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


@both_integrations
def test_handled_task_failure_is_one_event(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider, framework_integrations: bool
) -> None:
    """A handler for the task's error: Starlette re-raises it as "Caught handled exception" (``from`` it).

    uvicorn logs that wrapper. Sentry's Starlette integration captures it in its ASGI middleware and
    re-raises it ``from None``, erasing the cause; under an outer ``BaseHTTPMiddleware`` that capture
    happens in the middleware's own task, whose context hides it from Sentry's DedupeIntegration:
    uninstrumented, uvicorn's log record is a second event, of the wrapper alone.
    """
    app = BaseHTTPMiddleware(
        starlette_app(lambda tasks: tasks.add_task(charge, "4000000000000002"), handled=CardDeclined),
        dispatch=_passing,
    )
    bare = events_of(receiver, app, tracer_provider, instrumented=False, framework_integrations=framework_integrations)
    ours = events_of(receiver, app, tracer_provider, instrumented=True, framework_integrations=framework_integrations)

    wrapped = ["CardDeclined", "RuntimeError"]
    if not OLD_STARLETTE:  # 0.27's BaseHTTPMiddleware does not re-raise a failure after the response: no log record
        assert [exception_types(e) for e in bare] == (
            [wrapped, ["RuntimeError"]] if framework_integrations else [wrapped]
        )
    (event,) = ours
    assert exception_types(event) == ["CardDeclined"]
    assert event["tags"]["background_task"] == "charge"


def starlette_wrapper(error: Exception) -> RuntimeError:
    """Starlette's own "Caught handled exception" for ``error``: a task raises it, and a handler was set for it."""

    def task() -> None:
        raise error

    app = starlette_app(lambda tasks: tasks.add_task(task), handled=type(error))

    async def post() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await client.post("/orders/7")

    with pytest.raises(RuntimeError) as raised:
        asyncio.run(post())
    assert raised.value.__context__ is error
    return raised.value


def raised_while_handling(error: Exception, message: str, *, from_none: bool) -> RuntimeError:
    """The app's own error, raised in an ``except`` that caught ``error``."""
    try:
        raise error
    except CardDeclined as exc:
        try:
            if from_none:
                raise RuntimeError(message) from None
            raise RuntimeError(message) from exc
        except RuntimeError as own:
            return own
    raise AssertionError("unreachable")


def test_only_starlettes_wrapper_of_the_forwarded_exception_is_a_duplicate() -> None:
    """Starlette's "Caught handled exception" raised from the forwarded exception, whatever links it keeps.

    Not a wrapper of another exception, nor the app's own error chained to the forwarded one, even with
    Starlette's message.
    """
    error, erased = CardDeclined("0002"), CardDeclined("0004")
    wrapper, wrapper_of_erased = starlette_wrapper(error), starlette_wrapper(erased)
    other = starlette_wrapper(CardDeclined("0003"))
    sentry.forwarded.add(error)
    sentry.forwarded.add(erased)

    def duplicate(exc: BaseException) -> bool:
        return sentry._is_duplicate({}, {"exc_info": (type(exc), exc, exc.__traceback__)})  # pyright: ignore[reportPrivateUsage]

    # As Starlette raised it: sentry-sdk's ASGI middleware, patched into Starlette by an earlier test, erases it.
    wrapper.__cause__ = error
    assert duplicate(error) and duplicate(wrapper)
    assert not duplicate(other)
    # Re-raised from None, as sentry-sdk's ASGI middleware does with what it captured: the context is left.
    try:
        raise wrapper_of_erased from None
    except RuntimeError:
        pass
    assert wrapper_of_erased.__cause__ is None and wrapper_of_erased.__context__ is erased
    assert duplicate(wrapper_of_erased)
    # And the context cleared too, as anyio 3's task groups do: the wrapper seen before is known by itself.
    for seen in (wrapper, other):
        seen.__cause__ = seen.__context__ = None
    assert duplicate(wrapper)
    assert not duplicate(other)
    own = [
        raised_while_handling(error, message, from_none=from_none)
        for message in (wrapper.args[0], "the app's own message")
        for from_none in (False, True)
    ]
    assert [duplicate(exc) for exc in own] == [False] * 4


class Interrupt(KeyboardInterrupt):
    pass


def fails_with(error: BaseException) -> Callable[[], None]:
    def task() -> None:
        raise error

    return task


@pytest.mark.parametrize(
    "make", [lambda: CardDeclined("0002"), lambda: KeyError("sku-1"), KeyboardInterrupt, Interrupt], ids=repr
)
def test_forwarded_exception_carries_no_mark(
    receiver: EnvelopeReceiver, tracer_provider: TracerProvider, make: Callable[[], BaseException]
) -> None:
    """What reaches the caller is the exception as raised: nothing added to ``vars(exc)``; and one event."""
    error = make()
    before = dict(vars(error))
    init_sentry(receiver.dsn, framework_integrations=False)
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    with pytest.raises(type(error)) as raised:
        asyncio.run(BackgroundTask(fails_with(error))())
    sentry_sdk.flush(timeout=5)

    assert raised.value is error
    assert vars(error) == before
    assert not hasattr(error, "__otel_bgtasks_forwarded__")
    assert error in sentry.forwarded
    (event,) = receiver.events
    assert exception_types(event)[-1] == type(error).__name__
    assert event["tags"]["background_task"] == "fails_with.<locals>.task"


def raise_key_error(key: str) -> KeyError:
    try:
        raise KeyError(key)
    except KeyError as exc:
        return exc


def reraised(error: KeyError) -> KeyError:
    try:
        raise error
    except KeyError as exc:
        return exc


def test_forwarded_set_holds_no_exception() -> None:
    """An exception of its own class leaves the set when it is freed; a builtin one is known by its traceback."""
    forwarded = sentry.ForwardedExceptions()
    error: BaseException | None = CardDeclined("0002")
    forwarded.add(error)
    assert error in forwarded and len(forwarded) == 1
    error = None
    gc.collect()
    assert len(forwarded) == 0

    first, second = raise_key_error("a"), raise_key_error("a")
    forwarded.add(first)
    assert first in forwarded and second not in forwarded
    assert reraised(first) in forwarded  # propagated further: entries added on the outside
    assert KeyError("a") not in forwarded  # never raised: nothing propagates it
    forwarded.add(KeyError("b"))  # never raised: not remembered
    assert len(forwarded) == 1
    kept = [raise_key_error("c") for _ in range(300)]
    for one in kept:
        forwarded.add(one)
    assert len(forwarded) == 256  # only the last ones: a freed one's id may come back
    assert kept[-1] in forwarded and kept[0] not in forwarded


def test_a_freed_builtin_exceptions_address_taken_by_another_is_no_duplicate() -> None:
    """A builtin exception is known by its id, type and traceback: another at the same address is reported.

    CPython reuses a freed object's address at once; the entry is moved by hand to where the new one lives.
    """
    forwarded = sentry.ForwardedExceptions()
    first = raise_key_error("a")
    forwarded.add(first)
    entries = forwarded._builtin  # pyright: ignore[reportPrivateUsage]
    other = raise_key_error("a")  # same type, raised by the same line, with a traceback of its own
    entries[id(other)] = entries.pop(id(first))
    assert other not in forwarded
    # Its own traceback, but of another type: not the one forwarded either.
    entries[id(other)] = (ValueError, sentry._path(other.__traceback__))  # pyright: ignore[reportPrivateUsage]
    assert other not in forwarded
    entries[id(other)] = (KeyError, sentry._path(other.__traceback__))  # pyright: ignore[reportPrivateUsage]
    assert other in forwarded  # the same entry with its type: what the two checks above hold apart


class ProcessorBroken(Exception):
    pass


class BrokenProcessor(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name.startswith("BackgroundTask"):
            raise ProcessorBroken("a span processor that fails")


def test_an_internal_error_still_reaches_sentry(receiver: EnvelopeReceiver) -> None:
    """otel_bgtasks' own failure is an event while task failures are forwarded (and the task runs as it would)."""
    ran: list[str] = []
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BrokenProcessor())
    app = starlette_app(lambda tasks: tasks.add_task(ran.append, "ran"))
    events = events_of(receiver, app, tracer_provider, instrumented=True, framework_integrations=False)
    assert ran == ["ran"]
    (event,) = events
    assert event["logger"] == "otel_bgtasks"
    assert event["logentry"]["message"].startswith("otel_bgtasks failed internally")
    assert exception_types(event) == ["ProcessorBroken"]


def test_skipped_breadcrumbs_are_bounded(receiver: EnvelopeReceiver, tracer_provider: TracerProvider) -> None:
    """A failure that left 30 tasks unrun: 20 breadcrumbs name them, one counts the other 10."""
    init_sentry(receiver.dsn, framework_integrations=False)
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    tasks = BackgroundTasks()
    tasks.add_task(charge, "4000000000000002")
    for index in range(30):
        tasks.add_task(print, index)
    with pytest.raises(CardDeclined):
        asyncio.run(tasks())
    sentry_sdk.flush(timeout=5)

    (event,) = receiver.events
    crumbs = [b for b in event["breadcrumbs"]["values"] if b.get("category") == "background_task"]
    assert [b["data"].get("code.function.name") for b in crumbs] == ["builtins.print"] * 20 + [None]
    assert crumbs[-1]["message"] == "Skipped 10 more: an earlier task in the same BackgroundTasks failed"
    assert crumbs[-1]["data"]["count"] == 10
