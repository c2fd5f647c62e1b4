"""A background task that writes to a database: open a session in the task, don't reuse the request's.

The code is in ``otel_bgtasks/cli/demo_app.py`` (``database_router``); in short::

    # Right: pass plain values; the task opens its own session. Its queries run under the task's
    # span, so the trace shows them nested inside "BackgroundTask record_signup".
    async def record_signup(database: Database, user_id: int) -> None:
        async with database.session() as session:
            session.add(AuditEntry(user_id=user_id, action="signup"))
            await session.commit()

    @app.post("/audit")
    async def audit(tasks: BackgroundTasks, database: DatabaseDependency) -> dict[str, int]:
        async with database.session() as session:
            user = await create_user(session, "grace@example.com")
            tasks.add_task(record_signup, database, user.id)
            return {"user_id": user.id}

    # Wrong: the task gets the request's session. Background tasks run after the response, so after
    # `async with database.session()` closed it. The task's span is marked as an error, with
    # error.type=sqlalchemy.exc.InvalidRequestError: "This Session has been permanently closed...".
    tasks.add_task(record_signup_in, session, user.id)

The engine is SQLAlchemy's async one on an in-memory SQLite database (``sqlite+aiosqlite``), made by
the app's lifespan (``database_lifespan``) when it starts, its queries traced with
``SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)``. The
sessions are made with ``close_resets_only=False``: with SQLAlchemy's default, the wrong pattern
silently opens a new transaction on the closed session instead of failing.

Run it from the repository root, alone, with spans printed to the console:

.. code-block:: bash

    opentelemetry-instrument --traces_exporter console --metrics_exporter none --logs_exporter none \\
        uvicorn examples.database:app
    curl -X POST localhost:8000/audit-wrong   # from another terminal

``examples/fastapi_app.py`` serves these routes along with the others.
"""

from fastapi import FastAPI

import otel_bgtasks
from otel_bgtasks.cli.demo_app import database_lifespan, database_router

app = FastAPI(title="otel_bgtasks database example", lifespan=database_lifespan)
app.include_router(database_router)  # POST /audit (right) and POST /audit-wrong (wrong)
otel_bgtasks.instrument(app)
