"""The tasks and routes of the golden scenarios (tests/test_outputs_unchanged.py), in a module of their own.

Their line numbers are part of the recorded outputs (``code.line.number``, the creation site in log
messages), so this module must only change together with tests/golden/outputs.json: regenerate it
(see test_outputs_unchanged.py) after any edit here, and add new code at the end.
Each ``*_tasks()`` function returns what one scenario's route queues, as ``(func, args, kwargs)``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from conftest import WITHOUT_NATIVE_TELEMETRY
from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

Queued = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_F = TypeVar("_F", bound=Callable[..., Any])


def golden_app(make_tasks: Callable[[], list[Queued]]) -> FastAPI:
    """A FastAPI app (native telemetry off: the same on every stack) whose ``GET /`` queues ``make_tasks()``."""
    app = FastAPI(**WITHOUT_NATIVE_TELEMETRY)

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        for func, args, kwargs in make_tasks():
            background_tasks.add_task(func, *args, **kwargs)
        return {"ok": True}

    return app


def starlette_app(task: BackgroundTask) -> Starlette:
    """A Starlette app whose ``GET /`` answers with ``task`` as the response's ``background=``: no list, no index."""

    async def route(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", background=task)

    return Starlette(routes=[Route("/", route)])


# -- the tasks ---------------------------------------------------------------------------------------


class PaymentDeclined(Exception):
    pass


async def refresh_cache(key: str) -> None:
    await asyncio.sleep(0)


def send_email(address: str) -> str:
    return address


async def charge_card(amount: int) -> None:
    raise PaymentDeclined(f"card declined for {amount} EUR")


def write_audit(entry: str) -> None:
    raise ValueError(f"audit log full, lost {entry!r}")


async def sleep_past_timeout() -> None:
    await asyncio.sleep(10)


def work_past_timeout() -> None:
    time.sleep(0.35)  # a sync task cannot be cancelled: reported as over its timeout when it ends


async def block_the_loop() -> None:
    time.sleep(0.15)  # the mistake: a blocking call in an async def task


async def run_a_loop_inside_the_loop() -> None:
    coroutine = asyncio.sleep(0)
    try:
        asyncio.run(coroutine)  # the mistake: this task already runs on the server's loop
    finally:
        coroutine.close()


def use_closed_session(session: Session) -> None:
    session.execute(text("SELECT 1"))


def log_calls(func: _F) -> _F:
    """A home-made ``functools.wraps`` decorator, as found in many apps."""

    @functools.wraps(func)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return logged  # type: ignore[return-value]


@log_calls
def decorated_report(user_id: int) -> None:
    pass


def partial_target(channel: str, message: str) -> None:
    pass


class Mailer:
    def send(self, address: str) -> None:
        pass


class Notifier:
    def __call__(self, user: str) -> None:
        pass


class Signup(BaseModel):
    email: str
    password: str


@dataclass
class Credentials:
    user: str
    password: str


def register(signup: Signup, credentials: Credentials, *, api_key: str, plan: str) -> None:
    pass


# -- what each scenario queues -----------------------------------------------------------------------


def async_tasks() -> list[Queued]:
    return [(refresh_cache, ("users",), {}), (refresh_cache, ("orders",), {}), (refresh_cache, (), {"key": "x"})]


def def_tasks() -> list[Queued]:
    return [(send_email, ("ann@example.com",), {}), (send_email, (), {"address": "bob@example.com"})]


def callables_tasks() -> list[Queued]:
    return [
        (decorated_report, (7,), {}),
        (functools.partial(partial_target, "ops"), ("deployed",), {}),
        (Mailer().send, ("ann@example.com",), {}),
        (Notifier(), ("ann",), {}),
    ]


def failure_mid_list_tasks() -> list[Queued]:
    return [(send_email, ("ann@example.com",), {}), (charge_card, (42,), {}), (send_email, ("x",), {}), *def_tasks()]


def timeout_tasks() -> list[Queued]:
    return [(sleep_past_timeout, (), {}), (work_past_timeout, (), {}), (refresh_cache, ("after",), {})]


def blocking_tasks() -> list[Queued]:
    return [(block_the_loop, (), {}), (block_the_loop, (), {})]


def add_task_misuse_tasks() -> list[Queued]:
    return [(refresh_cache("users"), (), {}), (send_email, ("never",), {})]  # type: ignore[list-item]


def event_loop_conflict_tasks() -> list[Queued]:
    return [(run_a_loop_inside_the_loop, (), {})]


def session_outside_request_tasks() -> list[Queued]:
    closes_for_good = sessionmaker(create_engine("sqlite://"), close_resets_only=False)
    with closes_for_good() as session:  # closed when the route returns, before the task runs
        return [(use_closed_session, (session,), {})]


def plain_exception_tasks() -> list[Queued]:
    return [(write_audit, ("signup",), {})]


def dropped_tasks() -> list[Queued]:
    forgotten = StarletteBackgroundTasks()  # the mistake: filled, never attached to a response
    forgotten.add_task(send_email, "never@example.com")
    return [(send_email, ("ann@example.com",), {})]


def capture_args_tasks() -> list[Queued]:
    signup = Signup(email="ann@example.com", password="hunter2")
    credentials = Credentials(user="ann", password="hunter2")
    return [(register, (signup, credentials), {"api_key": "sk-live-123", "plan": "pro"})]


def starlette_failing_task() -> BackgroundTask:
    return BackgroundTask(write_audit, "refund")
