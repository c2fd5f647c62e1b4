"""The example app with no otel_bgtasks line: ``opentelemetry-instrument`` traces its background tasks.

The routes of ``examples/fastapi_app.py`` (their code is in ``otel_bgtasks/cli/demo_app.py``) in a FastAPI
app that never calls ``otel_bgtasks.instrument()``: ``opentelemetry-instrument`` sets the SDK up, loads
otel_bgtasks through its entry point ``background_tasks``, and opentelemetry-instrumentation-fastapi gives
the request spans that the task spans hang under. otel_bgtasks' hints ("Skipped 1 background task(s) ...")
come on stderr, next to the spans.

Run it from the repository root (the ``demo`` extra: the app's FastAPI, SQLAlchemy and uvicorn, and the
``zero-code`` extra, which is all your own app needs):

.. code-block:: bash

    pip install -e '.[demo]'          # from a clone of this repository
    pip install 'otel_bgtasks[demo]'  # the released package, once it is on PyPI
    opentelemetry-instrument --traces_exporter console --metrics_exporter none --logs_exporter none \\
        uvicorn examples.zero_code_app:app
    curl -X POST localhost:8000/order   # from another terminal
"""

from fastapi import FastAPI

from otel_bgtasks.cli.demo_app import database_lifespan, database_router, router

app = FastAPI(title="otel_bgtasks zero-code example", lifespan=database_lifespan)
app.include_router(router)
app.include_router(database_router)
