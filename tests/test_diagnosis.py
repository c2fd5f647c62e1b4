"""Causes 2 and 5 diagnosed: event-loop conflicts, and database sessions used after their request.

Every failure here is made by real code in a real FastAPI (or Starlette) app: asyncio's own errors,
asyncio objects and an httpx client bound to another loop, SQLAlchemy 2 sessions on SQLite (sync and
aiosqlite), sqlite3 and aiosqlite connections.
Each must give the task span ``background_task.diagnosis`` and the ERROR record a hint with the
fix; unrelated failures must give neither.
"""

import asyncio
import gc
import importlib.metadata
import logging
import sqlite3
import subprocess
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import aiosqlite
import anyio
import anyio.from_thread
import httpx
import pytest
import sentry_sdk
from _sentry_endpoint import SentryEndpoint, init_sentry
from _servers import serving
from conftest import task_spans
from fastapi import BackgroundTasks, Depends, FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import BaseModel
from sqlalchemy import Engine, ForeignKey, String, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.orm.exc import DetachedInstanceError
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import otel_bgtasks
from otel_bgtasks.diagnosis import diagnose, handed_over_session

ANYIO_3 = importlib.metadata.version("anyio").startswith("3.")  # raises a lone failure of a task group as is
EXCEPTION_GROUP = "ExceptionGroup" if sys.version_info >= (3, 11) else "exceptiongroup.ExceptionGroup"

LOOP = "event_loop_conflict"
SESSION = "session_outside_request"


# -- the app's database ------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "diagnosis_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    orders: Mapped[list["Order"]] = relationship(back_populates="user")


class Order(Base):
    __tablename__ = "diagnosis_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("diagnosis_users.id"))
    user: Mapped[User] = relationship(back_populates="orders")


def seed(session: Session) -> None:
    session.add(User(id=1, email="ada@example.com", orders=[Order(id=1), Order(id=2)]))
    session.commit()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def engine(database: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{database}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session)
    yield engine
    engine.dispose()


@pytest.fixture
async def async_engine(engine: Engine, database: Path) -> AsyncIterator[AsyncEngine]:
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{database}")  # the same, seeded, file
    yield async_engine
    await async_engine.dispose()


# -- running tasks in a request ------------------------------------------------------------------------


@pytest.fixture
def instrument(tracer_provider: TracerProvider) -> Callable[[FastAPI], FastAPI]:
    def instrument(app: FastAPI) -> FastAPI:
        # sentry=False: Sentry's test module may have imported sentry_sdk, and forwarding keeps the last
        # exceptions (and through their tracebacks, the clients below) alive.
        return otel_bgtasks.instrument(app, tracer_provider=tracer_provider, sentry=False)

    return instrument


async def get(app: Any, times: int = 1) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(times):
            response = await client.get("/")
            assert response.status_code == 200


def app_queueing(func: Callable[..., Any], *args: Any) -> FastAPI:
    """``GET /`` queues ``func(*args)``."""
    app = FastAPI()

    @app.get("/")
    async def queue(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(func, *args)
        return {"status": "queued"}

    return app


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "otel_bgtasks" and r.levelno == logging.ERROR]


def assert_diagnosed(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, diagnosis: str | None, hint: str = ""
) -> ReadableSpan:
    """The one task span failed with ``diagnosis``, and its ERROR record has the hint (or neither has one)."""
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["background_task.outcome"] == "error"
    assert span.attributes.get("background_task.diagnosis") == diagnosis
    (record,) = error_records(caplog)
    message = record.getMessage()
    if diagnosis is None:
        assert "Hint:" not in message
        assert not hasattr(record, "background_task.diagnosis")
    else:
        assert "Hint: " in message, message
        assert hint in message.split("Hint: ", 1)[1], message
        assert getattr(record, "background_task.diagnosis") == diagnosis
        assert message.startswith(f"Background task {span.attributes['code.function.name']} failed (error): ")
    return span


def collect_failure(errors: pytest.LogCaptureFixture, category: type[Warning]) -> None:
    """Let go of what the failure's traceback holds, and collect it now, without its expected warning.

    Some libraries leave things behind that warn when collected (the socket of a closed loop, a
    coroutine SQLAlchemy made but could not await): here, not in whichever test runs at the next GC.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        for record in error_records(errors):
            error = record.exc_info[1] if record.exc_info else None
            while error is not None:  # the log record keeps the tracebacks, and their frames the leftovers
                traceback.clear_frames(error.__traceback__)
                for frame, _ in traceback.walk_tb(error.__traceback__):
                    # Before Python 3.13 a frame keeps a copy of its locals once something read them (sentry-sdk
                    # does, for the event it makes of this ERROR record) and clear() leaves it: reading them
                    # again, now the frame is cleared, empties it.
                    frame.f_locals  # noqa: B018  # the read is the point
                error = error.__cause__ or error.__context__
        gc.collect()


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        yield caplog


# -- cause 2: event-loop conflicts -----------------------------------------------------------------------


async def render_report() -> str:
    return "report"


async def asyncio_run_in_async_task() -> None:
    report = render_report()
    try:
        asyncio.run(report)
    finally:
        report.close()  # asyncio.run refused it: close it, or Python warns "never awaited" at some later GC


async def run_until_complete_on_the_running_loop() -> None:
    report = render_report()
    try:
        asyncio.get_event_loop().run_until_complete(report)
    finally:
        report.close()


async def run_until_complete_on_a_new_loop() -> None:
    report = render_report()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(report)
    finally:
        report.close()
        loop.close()


async def asyncio_run_in_a_task_group() -> None:
    """anyio 4 wraps the failure in an ExceptionGroup."""
    async with anyio.create_task_group() as group:
        group.start_soon(asyncio_run_in_async_task)


@pytest.mark.parametrize(
    ("task", "error_type"),
    [
        (asyncio_run_in_async_task, "RuntimeError"),
        (run_until_complete_on_the_running_loop, "RuntimeError"),
        (run_until_complete_on_a_new_loop, "RuntimeError"),
        (asyncio_run_in_a_task_group, "RuntimeError" if ANYIO_3 else EXCEPTION_GROUP),
    ],
)
async def test_a_loop_run_inside_the_servers_loop(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture, task: Any, error_type: str
) -> None:
    await get(instrument(app_queueing(task)))

    span = assert_diagnosed(exporter, errors, LOOP, "await the coroutine instead of calling asyncio.run()")
    assert span.attributes is not None
    assert span.attributes["error.type"] == error_type


class SyncFailed(Exception):
    pass


async def reraised_without_from() -> None:
    """The app's own error raised while handling the real one: only ``__context__`` links them."""
    try:
        await asyncio_run_in_async_task()
    except RuntimeError:
        raise SyncFailed("could not sync the order")  # noqa: B904  # the mistake being diagnosed


async def test_a_mistake_reraised_in_except_without_from_is_still_diagnosed(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture
) -> None:
    await get(instrument(app_queueing(reraised_without_from)))

    span = assert_diagnosed(exporter, errors, LOOP, "await the coroutine instead of calling asyncio.run()")
    assert span.attributes is not None
    assert span.attributes["error.type"] == f"{__name__}.SyncFailed"


def in_thread(target: Callable[[], Any]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


async def contend(primitive: Any) -> None:
    """Two parties waiting on a Lock, Semaphore, Event or Queue: the first wait binds it to the running loop."""

    async def hold() -> None:
        async with primitive:
            await asyncio.sleep(0)

    async def release() -> None:
        await asyncio.sleep(0)
        if isinstance(primitive, asyncio.Event):
            primitive.set()
        else:
            primitive.put_nowait(1)

    if isinstance(primitive, asyncio.Event):
        await asyncio.gather(primitive.wait(), release())
        primitive.clear()
    elif isinstance(primitive, asyncio.Queue):
        await asyncio.gather(primitive.get(), release())  # pyright: ignore[reportUnknownMemberType]
    else:
        await asyncio.gather(hold(), hold())


@pytest.mark.parametrize("make", [asyncio.Lock, lambda: asyncio.Semaphore(1), asyncio.Event, asyncio.Queue])
async def test_an_asyncio_object_bound_to_another_loop(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture, make: Callable[[], Any]
) -> None:
    """A module-level lock/event/queue, first waited on by a worker loop started in a thread at import."""
    shared = make()
    in_thread(lambda: asyncio.run(contend(shared)))

    async def use_shared() -> None:
        await contend(shared)

    await get(instrument(app_queueing(use_shared)))

    span = assert_diagnosed(exporter, errors, LOOP, "create it in the app's lifespan or inside the task")
    assert span.status.description is not None
    assert span.status.description.endswith("is bound to a different event loop")


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as some apps start for a worker or a client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


async def test_a_future_attached_to_another_loop(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    """A result future made by a worker loop, awaited by the task (asyncpg's connections fail the same way)."""

    async def pending_result() -> asyncio.Future[int]:
        return asyncio.get_running_loop().create_future()

    result = asyncio.run_coroutine_threadsafe(pending_result(), other_loop).result()

    async def await_result() -> None:
        await result

    try:
        await get(instrument(app_queueing(await_result)))
    finally:
        other_loop.call_soon_threadsafe(result.cancel)

    span = assert_diagnosed(exporter, errors, LOOP, "created on another event loop")
    assert span.status.description is not None
    assert "attached to a different loop" in span.status.description


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hello")


@pytest.fixture
def remote_api() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 for the task's client to call, keeping connections alive.

    (A client shared with a loop still running in another thread fails too, "... is bound to a
    different event loop", but only when the reply is not there yet: a race, left out here.)
    """
    with serving(Starlette(routes=[Route("/", hello)])) as server:
        yield server.url


async def call_api(client: httpx.AsyncClient) -> None:
    await client.get("/")


@pytest.fixture(params=["sentry-off", "sentry-without-dsn", "sentry-sending"])
def sentry_state(request: pytest.FixtureRequest, receiver: SentryEndpoint) -> SentryEndpoint | None:
    """Sentry as the test is given it, whatever an earlier test left (``receiver`` sets it aside, then back).

    Returns the endpoint on 127.0.0.1 that "sentry-sending" sends to, else None.
    """
    if request.param == "sentry-off":
        return None
    sending = request.param == "sentry-sending"
    sentry_sdk.init(dsn=receiver.dsn if sending else None)
    return receiver if sending else None


async def test_an_httpx_client_warmed_up_on_a_loop_that_is_gone(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    remote_api: str,
    sentry_state: SentryEndpoint | None,
) -> None:
    """``asyncio.run(client.get(...))`` at import: the pooled connection belongs to a closed loop.

    Nothing otel_bgtasks keeps holds the client once the failure is reported, with or without Sentry.
    (Sentry keeps the exception itself: its DedupeIntegration holds the last one it saw, a builtin one by a
    strong reference, in a context variable of the test's task; its frames are cleared below all the same.)
    """
    module = {"client": httpx.AsyncClient(base_url=remote_api)}  # as a module-level client would be
    in_thread(partial(asyncio.run, module["client"].get("/")))
    app = FastAPI()

    @app.get("/")
    async def queue(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(call_api, module["client"])
        return {"status": "queued"}

    await get(instrument(app))

    span = assert_diagnosed(exporter, errors, LOOP, "create it in the app's lifespan or inside the task")
    assert span.status.description == "Event loop is closed"
    if sentry_state is not None:  # Sentry made its event of the failure (forwarding is off: of the ERROR record)
        sentry_sdk.flush(timeout=5)
        (event,) = sentry_state.events
        # The failure is the last entry Sentry lists (oldest first): sentry-sdk 2.0.0 lists a second
        # "Event loop is closed" before it, from the same log record; later releases list the one.
        (failure, *_) = reversed(event["exception"]["values"])
        assert (failure["type"], failure["value"]) == ("RuntimeError", span.status.description)
    alive = weakref.ref(module.pop("client"))
    collect_failure(errors, ResourceWarning)  # its socket cannot be closed properly: that needs its loop
    assert alive() is None


def get_event_loop_in_a_def_task() -> None:
    asyncio.get_event_loop().call_soon_threadsafe(print, "sent")


def get_running_loop_in_a_def_task() -> None:
    asyncio.get_running_loop().call_soon(print, "sent")


async def from_thread_in_an_async_task() -> None:
    anyio.from_thread.run(render_report)


@pytest.mark.parametrize(
    ("task", "message", "hint"),
    [
        (get_event_loop_in_a_def_task, "There is no current event loop in thread", "anyio.from_thread.run"),
        (get_running_loop_in_a_def_task, "no running event loop", "anyio.from_thread.run"),
        (from_thread_in_an_async_task, "AnyIO worker thread", "await the coroutine directly"),
    ],
)
async def test_async_code_called_from_the_wrong_thread(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    task: Any,
    message: str,
    hint: str,
) -> None:
    await get(instrument(app_queueing(task)))

    span = assert_diagnosed(exporter, errors, LOOP, hint)
    assert span.status.description is not None
    assert message in span.status.description


async def test_get_event_loop_in_a_starlette_def_task(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture
) -> None:
    """The same through a plain Starlette app and its own ``BackgroundTask``."""

    async def queue(request: Any) -> PlainTextResponse:
        return PlainTextResponse("queued", background=BackgroundTask(get_event_loop_in_a_def_task))

    app = Starlette(routes=[Route("/", queue)])
    await get(otel_bgtasks.instrument(app, tracer_provider=tracer_provider, sentry=False))

    assert_diagnosed(exporter, errors, LOOP, "make it async def and await")


# -- cause 5: database sessions used after their request ----------------------------------------------------


def count_orders(user: User) -> None:
    assert len(user.orders) == 2  # lazy-loaded: needs the user's session


def read_email(user: User) -> None:
    assert user.email


def refresh_in_own_session(engine: Engine, user: User) -> None:
    with Session(engine) as session:
        session.refresh(user)  # the request's object, in the task's session


def add_order(session: Session) -> None:
    session.add(Order(user_id=1))
    session.commit()


def select_one(connection: Any) -> None:
    connection.execute(text("SELECT 1"))


def read_users(users: Any) -> None:
    assert users.all()


def sync_session_app(engine: Engine, mistake: str) -> FastAPI:
    """A ``def`` route that closes its session (``with``) before returning, and hands part of it to a task."""
    app = FastAPI()
    closes_for_good = sessionmaker(engine, close_resets_only=False)  # else a closed Session silently reopens

    @app.get("/")
    def queue(background_tasks: BackgroundTasks) -> dict[str, str]:
        if mistake == "closed session":
            with closes_for_good() as session:
                background_tasks.add_task(add_order, session)
        elif mistake == "connection":
            with engine.connect() as connection:
                background_tasks.add_task(select_one, connection)
        elif mistake == "unread result":
            with Session(engine) as session:
                background_tasks.add_task(read_users, session.scalars(select(User)))
        elif mistake == "expired object":
            with Session(engine) as session:
                user = session.get(User, 1)
                session.commit()  # expires the loaded attributes, as every commit does by default
                background_tasks.add_task(read_email, user)
        elif mistake == "lazy relationship":
            with Session(engine) as session:
                background_tasks.add_task(count_orders, session.get(User, 1))
        else:
            assert mistake == "refresh in own session"
            with Session(engine) as session:
                background_tasks.add_task(refresh_in_own_session, engine, session.get(User, 1))
        return {"status": "queued"}

    return app


@pytest.mark.parametrize(
    ("mistake", "error_type", "message"),
    [
        ("lazy relationship", "sqlalchemy.orm.exc.DetachedInstanceError", "lazy load operation of attribute 'orders'"),
        ("expired object", "sqlalchemy.orm.exc.DetachedInstanceError", "is not bound to a Session"),
        ("refresh in own session", "sqlalchemy.exc.InvalidRequestError", "is not persistent within this Session"),
        ("closed session", "sqlalchemy.exc.InvalidRequestError", "This Session has been permanently closed"),
        ("connection", "sqlalchemy.exc.ResourceClosedError", "This Connection is closed"),
    ],
)
async def test_a_sync_session_closed_by_the_request(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    engine: Engine,
    mistake: str,
    error_type: str,
    message: str,
) -> None:
    await get(instrument(sync_session_app(engine, mistake)))

    span = assert_diagnosed(exporter, errors, SESSION, "open a new session inside the task")
    assert span.attributes is not None
    assert span.attributes["error.type"] == error_type
    assert span.status.description is not None
    assert message in span.status.description
    assert "pass ids rather than ORM objects" in errors.records[-1].getMessage()


async def test_a_result_read_after_its_pooled_connection_closed(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    database: Path,
    engine: Engine,
) -> None:
    """A query result handed to the task unread: NullPool really closes the connection at session close."""
    null_pool = create_engine(f"sqlite:///{database}", poolclass=NullPool)
    try:
        with quiet("sqlalchemy.pool", "sqlalchemy.engine"):  # SQLAlchemy logs its failed cursor close
            await get(instrument(sync_session_app(null_pool, "unread result")))
    finally:
        null_pool.dispose()

    span = assert_diagnosed(exporter, errors, SESSION, "open a new session inside the task")
    assert span.attributes is not None
    assert span.attributes["error.type"] == "sqlalchemy.exc.ProgrammingError"
    assert span.status.description is not None
    assert "Cannot operate on a closed database" in span.status.description


@contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence the named loggers: the expected noise of a failure, not the subject of the test."""
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger in loggers:
            logger.disabled = False


async def test_a_sqlite3_connection_closed_by_the_request(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture, database: Path, engine: Engine
) -> None:
    """No SQLAlchemy: the standard library's own connection, closed by the route's ``with closing(...)``."""

    def count_users(db: sqlite3.Connection) -> None:
        db.execute("SELECT count(*) FROM diagnosis_users")

    app = FastAPI()

    @app.get("/")
    def queue(background_tasks: BackgroundTasks) -> dict[str, str]:
        with closing(sqlite3.connect(database)) as db:
            background_tasks.add_task(count_users, db)
        return {"status": "queued"}

    await get(instrument(app))

    span = assert_diagnosed(exporter, errors, SESSION, "open a new session inside the task")
    assert span.attributes is not None
    assert span.attributes["error.type"] == "sqlite3.ProgrammingError"


# The same with the asyncio extension on aiosqlite.


async def add_order_async(session: AsyncSession) -> None:
    session.add(Order(user_id=1))
    await session.commit()


async def read_email_async(user: User) -> None:
    assert user.email


async def select_one_async(connection: Any) -> None:
    await connection.execute(text("SELECT 1"))


async def count_users_aiosqlite(db: aiosqlite.Connection) -> None:
    await db.execute("SELECT count(*) FROM diagnosis_users")


def request_scoped(sessions: async_sessionmaker[AsyncSession]) -> Callable[[], AsyncIterator[AsyncSession]]:
    """The usual session dependency: ``yield`` a session, closed when FastAPI ends the request."""

    async def request_session() -> AsyncIterator[AsyncSession]:
        async with sessions() as session:
            yield session

    return request_session


def async_session_app(engine: AsyncEngine, database: Path, mistake: str) -> FastAPI:
    app = FastAPI()
    closes_for_good = async_sessionmaker(engine, close_resets_only=False)
    sessions = async_sessionmaker(engine)

    @app.get("/")
    async def queue(
        background_tasks: BackgroundTasks, session: Annotated[AsyncSession, Depends(request_scoped(sessions))]
    ) -> dict[str, str]:
        if mistake == "closed session":
            async with closes_for_good() as closed:
                background_tasks.add_task(add_order_async, closed)
        elif mistake == "expired object":
            async with sessions() as closed:
                user = await closed.get(User, 1)
                await closed.commit()
            background_tasks.add_task(read_email_async, user)
        elif mistake == "lazy load":
            # The dependency's session: FastAPI closes it after the tasks (0.100 and 0.165, as tested here)
            # or before them (from 0.106 on, for a while). Lazy loading fails either way: MissingGreenlet
            # while it is open, DetachedInstanceError once closed.
            user = await session.get(User, 1)
            await session.commit()
            background_tasks.add_task(read_email_async, user)
        elif mistake == "connection":
            async with engine.connect() as connection:
                background_tasks.add_task(select_one_async, connection)
        else:
            async with aiosqlite.connect(database) as db:
                background_tasks.add_task(count_users_aiosqlite, db)
        return {"status": "queued"}

    return app


@pytest.mark.parametrize(
    ("mistake", "error_types", "hint"),
    [
        ("closed session", {"sqlalchemy.exc.InvalidRequestError"}, "open a new session inside the task"),
        ("expired object", {"sqlalchemy.orm.exc.DetachedInstanceError"}, "open a new session inside the task"),
        (
            "lazy load",
            # StatementError wrapping MissingGreenlet on SQLAlchemy 2.1, MissingGreenlet itself on 2.0.
            {
                "sqlalchemy.exc.StatementError",
                "sqlalchemy.exc.MissingGreenlet",
                "sqlalchemy.orm.exc.DetachedInstanceError",
            },
            "open a new",
        ),
        ("connection", {"sqlalchemy.exc.ResourceClosedError"}, "open a new session inside the task"),
        ("aiosqlite", {"ValueError"}, "open a new session inside the task"),
    ],
)
async def test_an_async_session_used_after_the_request(
    instrument: Any,
    exporter: InMemorySpanExporter,
    errors: pytest.LogCaptureFixture,
    async_engine: AsyncEngine,
    database: Path,
    mistake: str,
    error_types: set[str],
    hint: str,
) -> None:
    await get(instrument(async_session_app(async_engine, database, mistake)))

    span = assert_diagnosed(exporter, errors, SESSION, hint)
    assert span.attributes is not None
    assert span.attributes["error.type"] in error_types
    if span.attributes["error.type"] == "sqlalchemy.exc.StatementError":
        assert "MissingGreenlet" in str(span.status.description)
        collect_failure(errors, RuntimeWarning)  # "coroutine 'Connection.cursor' was never awaited"


# -- unrelated failures: no diagnosis -------------------------------------------------------------------------


async def bad_input() -> None:
    raise ValueError("bad input")


def missing_key() -> None:
    raise KeyError("customer")


async def provider_down() -> None:
    raise RuntimeError("payment provider timed out")


@pytest.mark.parametrize("task", [bad_input, missing_key, provider_down])
async def test_unrelated_failures_get_no_diagnosis(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture, task: Any
) -> None:
    await get(instrument(app_queueing(task)))

    assert_diagnosed(exporter, errors, None)


async def test_an_unrelated_database_error_gets_no_diagnosis(
    instrument: Any, exporter: InMemorySpanExporter, errors: pytest.LogCaptureFixture, engine: Engine
) -> None:
    def insert_twice() -> None:
        with Session(engine) as session:  # the right way: its own session; the error is the data's
            session.add(User(id=1, email="again@example.com"))
            session.commit()

    await get(instrument(app_queueing(insert_twice)))

    span = assert_diagnosed(exporter, errors, None)
    assert span.attributes is not None
    assert span.attributes["error.type"] == "sqlalchemy.exc.IntegrityError"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")


def test_diagnose_never_raises_and_follows_chains() -> None:
    assert diagnose(Unprintable()) is None  # its __str__ raises: not read, not diagnosed

    class Odd(Exception):
        @property
        def exceptions(self) -> Any:
            raise RuntimeError("This event loop is already running")

    assert diagnose(Odd()) is None

    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first  # a cycle
    assert diagnose(first) is None

    try:
        try:
            asyncio.get_running_loop()  # not in a coroutine: "no running event loop"
        except RuntimeError as exc:
            raise ValueError("could not send the email") from exc
    except ValueError as wrapped:
        found = diagnose(wrapped)
    assert found is not None and found.value == LOOP

    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ValueError("bad input") from None
    except ValueError as hidden:
        assert diagnose(hidden) is None  # ``from None``: the code said the context is not the cause


def test_a_subclass_of_a_known_exception_is_diagnosed() -> None:
    class StaleRow(DetachedInstanceError):  # an app's own refinement of SQLAlchemy's error
        pass

    found = diagnose(StaleRow("Instance <Order> is not bound"))
    assert found is not None and found.value == "session_outside_request"


async def test_the_hint_reaches_sentry(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, engine: Engine, receiver: SentryEndpoint
) -> None:
    init_sentry(receiver.dsn, framework_integrations=False)
    app = otel_bgtasks.instrument(sync_session_app(engine, "expired object"), tracer_provider=tracer_provider)
    await get(app)
    sentry_sdk.flush(timeout=5)

    (event,) = receiver.events
    assert event["tags"]["background_task.diagnosis"] == SESSION
    context = event["contexts"]["background_task"]
    assert context["diagnosis"] == SESSION
    assert "pass ids rather than ORM objects" in context["hint"]


# -- cause 5 before it fails: the request's session handed to a task --------------------------------------------


@dataclass
class Signup:
    email: str


class SignupModel(BaseModel):
    email: str


def sessions_app(engine: Engine, queue_tasks: Callable[[BackgroundTasks, Session], None]) -> FastAPI:
    """A ``def`` route with the usual session dependency (``yield``, closed when the request ends)."""
    app = FastAPI()
    sessions = sessionmaker(engine)

    def request_session() -> Iterator[Session]:
        with sessions() as session:
            yield session

    @app.get("/")
    def queue(
        background_tasks: BackgroundTasks, session: Annotated[Session, Depends(request_session)]
    ) -> dict[str, str]:
        queue_tasks(background_tasks, session)
        return {"status": "queued"}

    return app


def handed_over_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "received the request's database session" in r.getMessage()]


def handed_over_events(span: ReadableSpan) -> list[str]:
    return [
        str((e.attributes or {})["background_task.problem"])
        for e in span.events
        if e.name == "background_task.session_handed_over"
    ]


def audit_with_session(session: Session, user_id: int) -> None:
    assert session.get(User, user_id) is not None  # works while the request's session is open, or reopens


def audit_with_user(user: User) -> None:
    assert user.id == 1


async def test_a_task_given_the_requests_session_is_warned_once_even_if_it_succeeds(
    instrument: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, engine: Engine
) -> None:
    def queue_tasks(background_tasks: BackgroundTasks, session: Session) -> None:
        background_tasks.add_task(audit_with_session, session, 1)
        background_tasks.add_task(audit_with_user, user=session.get(User, 1))

    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        await get(instrument(sessions_app(engine, queue_tasks)), times=2)

    spans = task_spans(exporter)
    assert [s.attributes["background_task.outcome"] for s in spans if s.attributes] == ["success"] * 4
    by_function = {s.name: handed_over_events(s) for s in spans}
    assert by_function == {
        "BackgroundTask audit_with_session": ["args[0] is a SQLAlchemy Session (sqlalchemy.orm.session.Session)"],
        "BackgroundTask audit_with_user": [f"kwargs['user'] is an ORM object ({__name__}.User) attached to a Session"],
    }
    messages = handed_over_warnings(caplog)
    assert len(messages) == 2  # one per function, not one per task
    assert f"Background task {__name__}.audit_with_session received the request's database session" in messages[0]
    assert "args[0] is a SQLAlchemy Session" in messages[0]
    assert "works only by luck of timing" in messages[0]
    assert "Open a new session inside the task, and pass ids rather than ORM objects." in messages[0]
    assert "kwargs['user'] is an ORM object" in messages[1]


def audit_detached(user: User) -> None:
    assert user.email


async def audit_with_async_session(session: AsyncSession) -> None:
    assert await session.get(User, 1) is not None


async def test_async_sessions_and_detached_objects_are_warned_too(
    instrument: Any,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    engine: Engine,
    async_engine: AsyncEngine,
) -> None:
    sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    app = FastAPI()

    @app.get("/")
    async def queue(
        background_tasks: BackgroundTasks, session: Annotated[AsyncSession, Depends(request_scoped(sessions))]
    ) -> dict[str, str]:
        async with sessions() as own:
            user = await own.get(User, 1)
        background_tasks.add_task(audit_detached, user)  # loaded, then detached: works until it lazy-loads
        background_tasks.add_task(audit_with_async_session, session)
        return {"status": "queued"}

    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        await get(instrument(app))

    assert {s.name: handed_over_events(s) for s in task_spans(exporter)} == {
        "BackgroundTask audit_detached": [
            f"args[0] is an ORM object ({__name__}.User) detached from its closed Session"
        ],
        "BackgroundTask audit_with_async_session": [
            "args[0] is a SQLAlchemy AsyncSession (sqlalchemy.ext.asyncio.session.AsyncSession)"
        ],
    }
    assert len(handed_over_warnings(caplog)) == 2


def audit_plain(user_id: int, email: str, signup: Signup, model: SignupModel, draft: User, engine: Engine) -> None:
    pass


async def test_plain_arguments_and_the_engine_are_not_warned(
    instrument: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, engine: Engine
) -> None:
    def queue_tasks(background_tasks: BackgroundTasks, session: Session) -> None:
        user = session.get(User, 1)
        assert user is not None
        draft = User(email="new@example.com")  # transient: never added to a session
        background_tasks.add_task(
            audit_plain, user.id, user.email, Signup(user.email), SignupModel(email=user.email), draft, engine=engine
        )

    with caplog.at_level(logging.WARNING, logger="otel_bgtasks"):
        await get(instrument(sessions_app(engine, queue_tasks)))

    (span,) = task_spans(exporter)
    assert handed_over_events(span) == []
    assert handed_over_warnings(caplog) == []
    assert handed_over_session((1, "a"), {"b": None}) is None


def test_nothing_imports_sqlalchemy() -> None:
    """Recognising SQLAlchemy's errors and sessions must not import it into an app that does not use it."""
    code = (
        "import sys, otel_bgtasks.diagnosis as d\n"
        "assert d.diagnose(RuntimeError('This Connection is closed')).value == 'session_outside_request'\n"
        "assert d.handed_over_session((1, 'x'), {'y': object()}) is None\n"
        "assert 'sqlalchemy' not in sys.modules, sorted(m for m in sys.modules if 'sqlalchemy' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_task_added_as_a_coroutine_object_fails_with_the_misuse_diagnosis(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Cause 1: Starlette still tries to run ``add_task(send(...))``; its failure says why, with the fix."""

    async def send_report(address: str) -> None: ...

    app = FastAPI()

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(send_report("ann@example.com"))  # type: ignore[arg-type]  # the mistake
        return {"ok": True}

    otel_bgtasks.instrument(tracer_provider=tracer_provider, sentry=False)
    with caplog.at_level(logging.ERROR, logger="otel_bgtasks"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test"
        ) as client:
            await client.get("/")
    (span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("BackgroundTask ")]
    assert span.name.endswith("send_report")
    assert span.attributes is not None
    assert span.attributes["background_task.diagnosis"] == "add_task_misuse"
    assert span.attributes["error.type"] == "TypeError"
    failures = [r.getMessage() for r in caplog.records if "failed (error)" in r.getMessage()]
    assert len(failures) == 1
    assert "Hint: add_task()/BackgroundTask() was given a coroutine object" in failures[0]
    assert "add_task(" in failures[0] and "send_report, *args, **kwargs)" in failures[0]
