"""Sentry and OpenTelemetry together: each background-task failure is one Sentry event, tagged with its trace.

Run it (SENTRY_DSN from your Sentry project; without it Sentry stays off and nothing else changes):

.. code-block:: bash

    pip install -e '.[sentry,demo]'          # from a clone of this repository
    pip install 'otel_bgtasks[sentry,demo]'  # the released package, once it is on PyPI
    SENTRY_DSN=https://<key>@<org>.ingest.sentry.io/<project> \\
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 uvicorn examples.sentry_and_otel:app
    curl -X POST localhost:8000/orders/42   # from another terminal

The Sentry issue shows the tags ``background_task``, ``otel.trace_id`` and ``otel.span_id``; open
``http://localhost:16686/trace/<otel.trace_id>`` (the docker compose stack's Jaeger) to see the request
that queued the task, the failed task and the task it made Starlette skip.
"""

from __future__ import annotations

import os

import sentry_sdk
from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import otel_bgtasks

# Sentry first, with its own Starlette/FastAPI integrations on (the default): otel_bgtasks makes sure
# a task failure still arrives once, as the task's event rather than the request's.
sentry_sdk.init(dsn=os.environ.get("SENTRY_DSN"), traces_sample_rate=0)

provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_* configure it
trace.set_tracer_provider(provider)

app = FastAPI()
otel_bgtasks.instrument(app, sentry=True, capture_args=True)  # arguments reach Sentry only with send_default_pii


class PaymentDeclinedError(Exception):
    pass


def charge_card(order: int, card_token: str) -> None:
    raise PaymentDeclinedError(f"order {order}: card declined")  # card_token is sent as [redacted], if at all


def email_receipt(order: int) -> None:
    print(f"receipt for {order}")  # skipped: a breadcrumb on the Sentry event, a skipped span in Jaeger


@app.post("/orders/{order}")
async def place_order(order: int, background_tasks: BackgroundTasks) -> dict[str, int]:
    background_tasks.add_task(charge_card, order, card_token="tok_visa_4242")
    background_tasks.add_task(email_receipt, order)
    return {"order": order}
