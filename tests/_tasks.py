"""Tasks as users write them, and an app that queues them.

The decorators are the ones users put around task functions; each wraps many functions with one code object.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest
import tenacity
from fastapi import BackgroundTasks, FastAPI

_F = TypeVar("_F", bound=Callable[..., Any])
Task = tuple[Any, tuple[Any, ...]]


def log_calls(func: _F) -> _F:
    """A home-made decorator, as found in many apps: every function it wraps runs ``logged``'s code."""

    @functools.wraps(func)
    def logged(*args: Any, **kwargs: Any) -> Any:
        logging.getLogger("tests").debug("calling %s", func.__name__)
        return func(*args, **kwargs)

    return logged  # type: ignore[return-value]


def retry_once(func: _F) -> _F:
    """tenacity's @retry, as users apply it to tasks that call flaky services."""
    retry = tenacity.retry(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none(), reraise=True)
    return retry(func)  # type: ignore[return-value]


def log_calls_without_wraps(func: _F) -> _F:
    """The same decorator written without ``functools.wraps``: nothing says what ``logged`` wraps."""

    def logged(*args: Any, **kwargs: Any) -> Any:
        logging.getLogger("tests").debug("calling %s", func.__name__)
        return func(*args, **kwargs)

    return logged  # type: ignore[return-value]


# The decorators that say what they wrap (__wrapped__), and every decorator.
each_wrapping_decorator = pytest.mark.parametrize(
    "decorate", [log_calls, retry_once], ids=["functools.wraps", "tenacity"]
)
each_decorator = pytest.mark.parametrize(
    "decorate", [log_calls, retry_once, log_calls_without_wraps], ids=["functools.wraps", "tenacity", "without-wraps"]
)


def app_queueing(make_tasks: Callable[[], list[Task]]) -> FastAPI:
    """A FastAPI app whose ``GET /`` queues ``make_tasks()`` (called per request) as background tasks."""
    app = FastAPI()

    @app.get("/")
    async def route(background_tasks: BackgroundTasks) -> dict[str, bool]:
        for func, args in make_tasks():
            background_tasks.add_task(func, *args)
        return {"ok": True}

    return app


async def request(app: FastAPI, method: str = "GET", path: str = "/", *, times: int = 1, **options: Any) -> None:
    """Send ``times`` requests through httpx's ASGI transport; each must succeed."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(times):
            response = await client.request(method, path, **options)
            assert response.status_code == 200, response.text
