"""The routes and tasks of ``otel-bgtasks demo``: one route per background-task situation worth seeing.

They live in the package, not in ``examples/``, so that the installed console script can serve them;
``examples/fastapi_app.py`` and ``examples/database.py`` build their apps from the routers here.

- ``router``: tasks that succeed, fail, get skipped, run slowly, block the event loop, or are queued
  inside a span the route opened itself.
- ``database_router``: a task that writes to a database, done right (it opens its own session) and
  wrong (it reuses the request's), on SQLAlchemy's async engine with its queries traced. Its routes
  need ``database_lifespan`` as the app's lifespan: it opens the database.
- ``create_app()``: both routers, instrumented with the one-liner ``otel_bgtasks.instrument(app)``.
  That uses the global tracer provider, so set it (or run under ``opentelemetry-instrument``) first.

Importing this module creates no engine and instruments nothing: the app's lifespan does, when it starts.
Requires the ``demo`` extra: ``pip install 'otel_bgtasks[demo]'`` (released package) or
``pip install -e '.[demo]'`` (from a clone of the repository).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Annotated, Final, NamedTuple

from opentelemetry import trace

import otel_bgtasks
from otel_bgtasks.cli import demo_extra

with demo_extra():
    from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request
    from opentelemetry.instrumentation.sqlalchemy import (  # pyright: ignore[reportMissingTypeStubs]
        SQLAlchemyInstrumentor,
    )
    from sqlalchemy import ForeignKey, String
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
    from sqlalchemy.pool import StaticPool

tracer = trace.get_tracer(__name__)

# -- Tasks ------------------------------------------------------------------------------------------


def send_welcome_email(address: str) -> None:
    """A ``def`` task: Starlette runs it in a worker thread, so it may block."""
    time.sleep(0.02)


async def add_to_newsletter(address: str) -> None:
    """An ``async def`` task: it runs on the event loop, so it must only ``await``."""
    await asyncio.sleep(0.01)


class PaymentDeclinedError(Exception):
    """What a payment provider answers for a refused card."""


def charge_card(order_id: int, amount_cents: int) -> None:
    """Fails, and Starlette stops running the request's remaining tasks."""
    raise PaymentDeclinedError(f"order {order_id}: card declined (insufficient funds) for {amount_cents / 100:.2f} EUR")


def send_receipt(order_id: int) -> None:
    """Never runs: it was queued after ``charge_card``, which failed."""


def build_report(month: str) -> None:
    """Slow, but a ``def`` task: it occupies a worker thread, not the event loop."""
    time.sleep(0.3)


async def resize_images(count: int) -> None:
    """The classic mistake: a blocking call in an ``async def`` task freezes every request meanwhile."""
    time.sleep(0.2)  # should be `await asyncio.sleep(...)`, or the task a plain `def`


def upload_export(export_id: str) -> None:
    """Queued inside the route's own span, so its span is a child of that span."""
    time.sleep(0.01)


async def notify_followers(user_id: int) -> None:
    """Queued the wrong way: ``add_task(notify_followers(user_id))`` hands over a coroutine object."""
    await asyncio.sleep(0.01)


async def fetch_stock(sku: str) -> int:
    """An ``async def`` helper, as an async client's call would be."""
    await asyncio.sleep(0.001)
    return 3


async def sync_inventory(sku: str) -> None:
    """An event-loop conflict: ``asyncio.run`` inside a task that already runs on the server's event loop."""
    asyncio.run(fetch_stock(sku))  # should be `await fetch_stock(sku)`


# -- Routes -----------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/signup")
async def signup(tasks: BackgroundTasks) -> dict[str, str]:
    """Two tasks that succeed: one in the threadpool, one on the event loop."""
    tasks.add_task(send_welcome_email, "ada@example.com")
    tasks.add_task(add_to_newsletter, "ada@example.com")
    return {"status": "welcome"}


@router.post("/order")
async def order(tasks: BackgroundTasks) -> dict[str, str]:
    """A failing task, then one that is skipped because of it; the client already got its 200."""
    tasks.add_task(charge_card, 1042, 4999)
    tasks.add_task(send_receipt, 1042)
    return {"status": "order received"}


@router.get("/report")
async def report(tasks: BackgroundTasks) -> dict[str, str]:
    """A slow task: the client has its response long before the task ends."""
    tasks.add_task(build_report, "2024-05")
    return {"status": "report queued"}


@router.get("/blocking")
async def blocking(tasks: BackgroundTasks) -> dict[str, str]:
    """An ``async def`` task that blocks the event loop."""
    tasks.add_task(resize_images, 12)
    return {"status": "resizing"}


@router.get("/sync-route")
def sync_route(tasks: BackgroundTasks) -> dict[str, str]:
    """A ``def`` route (run in a worker thread) that queues its task inside a span of its own."""
    with tracer.start_as_current_span("prepare export"):
        tasks.add_task(upload_export, "exp-7")
    return {"status": "export queued"}


@router.post("/follow")
async def follow(tasks: BackgroundTasks) -> dict[str, str]:
    """The ``add_task(coroutine)`` mistake: the function called instead of passed."""
    # The mistake: should be add_task(notify_followers, 7). Type checkers catch it; Starlette does not.
    tasks.add_task(notify_followers(7))  # pyright: ignore[reportArgumentType, reportCallIssue]
    return {"status": "following"}


@router.post("/inventory")
async def inventory(tasks: BackgroundTasks) -> dict[str, str]:
    """A task that starts an event loop of its own inside the server's."""
    tasks.add_task(sync_inventory, "sku-42")
    return {"status": "syncing"}


# -- Database ---------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    """The demo's tables."""


class User(Base):
    """A user created by a request."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    audit_entries: Mapped[list[AuditEntry]] = relationship()  # loaded on first access, by its session


class AuditEntry(Base):
    """A row a background task writes after the response."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(50))


class Database:
    """The demo's database: an engine and a way to open sessions on it, made when the app starts."""

    def __init__(self, url: str = "sqlite+aiosqlite:///:memory:") -> None:
        # In memory, on one shared connection (StaticPool), so the demo needs no file and no cleanup.
        self.engine: AsyncEngine = create_async_engine(url, poolclass=StaticPool)
        # expire_on_commit=False: the usual asyncio setting; objects stay readable after commit without a query.
        # close_resets_only=False: a closed session stays closed, so using it after its request ended fails
        # loudly instead of silently starting a new transaction.
        self.session = async_sessionmaker(self.engine, expire_on_commit=False, close_resets_only=False)


@asynccontextmanager
async def database_lifespan(app: FastAPI) -> AsyncGenerator[None]:
    """Open the database when the app starts, close it when it stops: pass it as the app's ``lifespan=``.

    The database routes find it in ``app.state.database``.
    """
    database = Database()
    # Every query becomes a span, under whatever span is current: the request's or the task's. Unless
    # opentelemetry-instrument did it already (it then traces every engine created after it).
    # skip_dep_check: the instrumentation declares sqlalchemy < 2.1 and would refuse 2.1, which it traces fine.
    instrumentor = SQLAlchemyInstrumentor()
    ours = not instrumentor.is_instrumented_by_opentelemetry
    if ours:
        instrumentor.instrument(engine=database.engine.sync_engine, skip_dep_check=True)
    try:
        # Under one span: its connect, PRAGMA and CREATE queries would otherwise each be a trace of its own.
        with tracer.start_as_current_span("demo database set-up"):
            async with database.engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
        app.state.database = database
        yield
    finally:
        await database.engine.dispose()
        if ours:
            instrumentor.uninstrument()


def get_database(request: Request) -> Database:
    """The database ``database_lifespan`` opened, for a route: ``database: DatabaseDependency``."""
    database: Database = request.app.state.database
    return database


DatabaseDependency = Annotated[Database, Depends(get_database)]
database_router = APIRouter()


async def create_user(session: AsyncSession, email: str) -> User:
    """Insert a user in the request's session."""
    user = User(email=email)
    session.add(user)
    await session.commit()
    return user


async def record_signup(database: Database, user_id: int) -> None:
    """Right: the task opens its own session, so its queries run (and nest) under the task's span."""
    async with database.session() as session:
        session.add(AuditEntry(user_id=user_id, action="signup"))
        await session.commit()


async def record_signup_in(session: AsyncSession, user_id: int) -> None:
    """Wrong: the task uses the request's session, which the route's ``async with`` closed before the task ran.

    With ``close_resets_only=False`` that fails at once; with SQLAlchemy's default it would quietly
    open a new transaction on a session whose lifetime the request was supposed to own.
    """
    session.add(AuditEntry(user_id=user_id, action="signup"))
    await session.commit()


async def send_activity_digest(user: User) -> None:
    """Wrong: the task touches an ORM object the request loaded, once the request's session has closed.

    Its ``audit_entries`` were never loaded: reading them needs the session, gone with the request.
    """
    actions = [entry.action for entry in user.audit_entries]
    await asyncio.sleep(0.001 * len(actions))  # the e-mail would be sent here


@database_router.post("/audit")
async def audit(tasks: BackgroundTasks, database: DatabaseDependency) -> dict[str, int]:
    """Pass plain values to the task; it opens its own session."""
    async with database.session() as session:
        user = await create_user(session, "grace@example.com")
        tasks.add_task(record_signup, database, user.id)
        return {"user_id": user.id}


@database_router.post("/audit-wrong")
async def audit_wrong(tasks: BackgroundTasks, database: DatabaseDependency) -> dict[str, int]:
    """Pass the request's session to the task; it is closed by the time the task runs."""
    async with database.session() as session:
        user = await create_user(session, "alan@example.com")
        tasks.add_task(record_signup_in, session, user.id)
        return {"user_id": user.id}


@database_router.post("/digest")
async def digest(tasks: BackgroundTasks, database: DatabaseDependency) -> dict[str, int]:
    """Pass an ORM object to the task; the session it belongs to is closed by the time the task runs."""
    async with database.session() as session:
        user = await create_user(session, "edsger@example.com")
        tasks.add_task(send_activity_digest, user)
        return {"user_id": user.id}


# -- The app ----------------------------------------------------------------------------------------


def create_app() -> FastAPI:
    """The demo app; a function, so that importing the routers instruments nothing."""
    app = FastAPI(title="otel_bgtasks demo", lifespan=database_lifespan)
    app.include_router(router)
    app.include_router(database_router)
    otel_bgtasks.instrument(app)  # one span per background task, under the span that queued it
    return app


class DemoRequest(NamedTuple):
    """One request the demo sends, what its trace shows, and how many task spans it ends with."""

    method: str
    path: str
    shows: str
    tasks: int = 1


REQUESTS: Final = (
    DemoRequest("POST", "/signup", "two tasks that succeed: a def task (threadpool) and an async one", 2),
    DemoRequest("POST", "/order", "a task fails, so the task queued after it is skipped", 2),
    DemoRequest("GET", "/report", "a slow def task: the client had its response long before it finished"),
    DemoRequest("GET", "/blocking", "an async task calling time.sleep(): it blocks the event loop"),
    DemoRequest("GET", "/sync-route", "a def route queues its task inside its own span"),
    DemoRequest("POST", "/audit", "right: the task opens its own DB session; its queries nest under it"),
    DemoRequest("POST", "/audit-wrong", "wrong: the task reuses the request's session, closed by then"),
    DemoRequest("POST", "/digest", "wrong: the task reads an ORM object whose session the request closed"),
    DemoRequest("POST", "/follow", "add_task(notify_followers(7)): a coroutine object instead of the function"),
    DemoRequest("POST", "/inventory", "an event-loop conflict: asyncio.run() inside an async task"),
)
