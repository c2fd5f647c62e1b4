"""Plain Starlette with otel_bgtasks: both ways of attaching background tasks to a response are traced.

- ``GET /single``: ``Response(background=BackgroundTask(func, ...))``, one task.
- ``GET /many``: ``BackgroundTasks``, several tasks run in order after the response; the second fails.

Run it from the repository root, with spans printed to the console:

.. code-block:: bash

    pip install -e '.[demo]'          # from a clone of this repository
    pip install 'otel_bgtasks[demo]'  # the released package, once it is on PyPI
    opentelemetry-instrument --traces_exporter console --metrics_exporter none --logs_exporter none \\
        uvicorn examples.starlette_app:app
    curl localhost:8000/many   # from another terminal
"""

import asyncio
import time

from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import otel_bgtasks


def write_access_log(path: str) -> None:
    time.sleep(0.01)  # a `def` task: Starlette runs it in the thread pool


async def warm_cache(key: str) -> None:
    await asyncio.sleep(0.01)  # an `async def` task: it runs on the event loop


def notify_webhook(url: str) -> None:
    raise ConnectionError(f"POST {url}: connection refused")


async def single(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, background=BackgroundTask(write_access_log, request.url.path))


async def many(request: Request) -> Response:
    tasks = BackgroundTasks()
    tasks.add_task(warm_cache, "home")
    tasks.add_task(notify_webhook, "https://hooks.example.com/orders")
    tasks.add_task(write_access_log, request.url.path)  # skipped: the webhook task before it fails
    return JSONResponse({"status": "ok"}, background=tasks)


app = Starlette(routes=[Route("/single", single), Route("/many", many)])

# The one line: a span per task and, since plain Starlette has no request spans of its own, the
# OpenTelemetry ASGI middleware for those (unless something already added it).
otel_bgtasks.instrument(app)
