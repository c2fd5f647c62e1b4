"""FastAPI with otel_bgtasks: every background task gets a span, under the request that queued it.

The routes (their code is in ``otel_bgtasks/cli/demo_app.py``, which ``otel-bgtasks demo`` serves too):

- ``POST /signup``: two tasks that succeed, a ``def`` one (run in the thread pool) and an ``async def`` one.
- ``POST /order``: a task that fails (``PaymentDeclinedError``), so the task queued after it is skipped.
- ``GET /report``: a slow ``def`` task; the client has its response long before it ends.
- ``GET /blocking``: an ``async def`` task calling ``time.sleep``, which blocks the event loop.
- ``GET /sync-route``: a ``def`` route that queues its task inside its own span, ``prepare export``.
- ``POST /follow``: ``add_task(notify_followers(7))``, a coroutine object instead of the function.
- ``POST /inventory``: an ``async def`` task calling ``asyncio.run()``, an event-loop conflict.
- ``POST /audit`` and ``POST /audit-wrong``: a task writing to a database with its own session (right)
  or the request's, closed by then (wrong); see ``examples/database.py``.
- ``POST /digest``: a task reading an ORM object whose session the request closed (``DetachedInstanceError``).

Run it, from the repository root, with spans printed to the console:

.. code-block:: bash

    pip install -e '.[demo]'          # from a clone of this repository
    pip install 'otel_bgtasks[demo]'  # the released package, once it is on PyPI
    opentelemetry-instrument --traces_exporter console --metrics_exporter none --logs_exporter none \\
        uvicorn examples.fastapi_app:app
    curl -X POST localhost:8000/order   # from another terminal

or see every route's trace as a tree, with no server to start: ``otel-bgtasks demo``.
"""

from fastapi import FastAPI

import otel_bgtasks
from otel_bgtasks.cli.demo_app import database_lifespan, database_router, router

app = FastAPI(title="otel_bgtasks example", lifespan=database_lifespan)
app.include_router(router)
app.include_router(database_router)

# The one line. No tracer_provider argument: it uses the global one, which opentelemetry-instrument
# (or your own SDK setup, run before this import) provides.
otel_bgtasks.instrument(app)
