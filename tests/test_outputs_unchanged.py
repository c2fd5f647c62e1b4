"""What otel_bgtasks emits, per scenario, compared with what it emitted when tests/golden/outputs.json was made.

A guard for rewrites of the hot path (wrappers.py, task_state.py, blocking.py, metrics.py): each scenario
serves one request through a real FastAPI (or Starlette) app instrumented with the real SDK, and its spans,
metric points and log records, made comparable by tests/_outputs.py, must equal the recorded ones.

When a change to the outputs is intended, regenerate the file and review its diff before committing::

    OTEL_BGTASKS_REGENERATE_GOLDEN=1 python -m pytest tests/test_outputs_unchanged.py

The tasks and routes are in tests/_golden_tasks.py, whose line numbers the file records. Every scenario
runs with ``blocking_threshold=2.0`` unless it tests blocking: on a busy machine a trivial async task may
be descheduled for 0.1 s (the default), and the outputs must not depend on the machine's load.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import _golden_tasks as tasks
import httpx
import pytest
from _outputs import log_records, metric_points, spans
from conftest import starlettes_refusal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_bgtasks

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
REGENERATE = os.environ.get("OTEL_BGTASKS_REGENERATE_GOLDEN") == "1"
# Starlette's TypeError for add_task(coroutine) as the recorded (newest) Starlette words it: starlettes_refusal()
RECORDED_REFUSAL = "the first argument must be callable"
UNSAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}


@dataclass(frozen=True)
class Scenario:
    app: Callable[[], Any]
    options: dict[str, Any] = field(default_factory=dict[str, Any])
    headers: dict[str, str] = field(default_factory=dict[str, str])


def fastapi(make_tasks: Callable[[], list[tasks.Queued]]) -> Callable[[], Any]:
    return lambda: tasks.golden_app(make_tasks)


SCENARIOS: dict[str, Scenario] = {
    "async_success": Scenario(fastapi(tasks.async_tasks)),
    "def_success": Scenario(fastapi(tasks.def_tasks)),
    "callables": Scenario(fastapi(tasks.callables_tasks)),
    "failure_mid_list": Scenario(fastapi(tasks.failure_mid_list_tasks)),
    "continue_on_error": Scenario(fastapi(tasks.failure_mid_list_tasks), {"continue_on_error": True}),
    "unsampled_request": Scenario(fastapi(tasks.failure_mid_list_tasks), headers=UNSAMPLED_PARENT),
    "link_mode": Scenario(fastapi(tasks.failure_mid_list_tasks), {"mode": "link"}),
    "timeout": Scenario(fastapi(tasks.timeout_tasks), {"timeout": 0.25, "continue_on_error": True}),
    "dropped_task": Scenario(fastapi(tasks.dropped_tasks)),
    "capture_args": Scenario(fastapi(tasks.capture_args_tasks), {"capture_args": True, "redact_keys": ["plan"]}),
    "queue_duration_metric": Scenario(fastapi(tasks.def_tasks), {"queue_duration_metric": True}),
    "starlette_response_background": Scenario(lambda: tasks.starlette_app(tasks.starlette_failing_task())),
    # The five causes of a failing or stalling task: three have a background_task.diagnosis value, blocking has
    # its event and metric, a plain exception has neither. The add_task misuse is also the invalid-task event.
    "cause_add_task_misuse": Scenario(fastapi(tasks.add_task_misuse_tasks)),
    "cause_event_loop_conflict": Scenario(fastapi(tasks.event_loop_conflict_tasks)),
    "cause_blocking": Scenario(fastapi(tasks.blocking_tasks), {"blocking_threshold": 0.1}),
    "cause_session_outside_request": Scenario(fastapi(tasks.session_outside_request_tasks)),
    "cause_plain_exception": Scenario(fastapi(tasks.plain_exception_tasks)),
}


async def run(
    scenario: Scenario,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> dict[str, Any]:
    """Serve one request of ``scenario``'s app; what it emitted, normalised as JSON data."""
    reader = InMemoryMetricReader()  # a meter provider of its own: counts start at zero
    options: dict[str, Any] = {"sentry": False, "blocking_threshold": 2.0, **scenario.options}
    app = otel_bgtasks.instrument(
        scenario.app(), tracer_provider=tracer_provider, meter_provider=MeterProvider([reader]), **options
    )
    with caplog.at_level(logging.INFO, logger="otel_bgtasks"):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/", headers=scenario.headers)
        gc.collect()  # a dropped task is reported when it is collected
    assert response.status_code == 200, response.text
    outputs = {
        "spans": spans(exporter.get_finished_spans()),
        "metrics": metric_points(reader.get_metrics_data()),
        "logs": log_records(caplog.records),
    }
    return json.loads(json.dumps(outputs))


def flat(value: Any, path: str = "") -> dict[str, Any]:
    """``value`` as ``{"spans[1].attributes.code.line.number": 63, ...}``: pytest's diff then names what changed."""
    if isinstance(value, dict) and value:
        pairs = [(f"{path}.{key}" if path else key, item) for key, item in cast(dict[str, Any], value).items()]
    elif isinstance(value, list) and value:
        pairs = [(f"{path}[{i}]", item) for i, item in enumerate(cast(list[Any], value))]
    else:
        return {path: value}
    return {key: leaf for inner_path, item in pairs for key, leaf in flat(item, inner_path).items()}


def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.usefixtures("fresh_guard")
async def test_outputs_unchanged(
    name: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    outputs = await run(SCENARIOS[name], tracer_provider, exporter, caplog)
    if REGENERATE:
        recorded = {key: value for key, value in golden().items() if key in SCENARIOS}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**recorded, name: outputs}, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden(), f"no recorded outputs for {name!r}: regenerate {GOLDEN.name} (see this module's docstring)"
    expected = golden()[name]
    refusal = starlettes_refusal("coroutine")
    if refusal != RECORDED_REFUSAL:  # the same TypeError, in the words of an older Starlette (cause_add_task_misuse)
        expected = json.loads(json.dumps(expected).replace(RECORDED_REFUSAL, refusal))
    assert flat(outputs) == flat(expected)


def test_every_recorded_scenario_still_runs() -> None:
    """A scenario renamed or removed must leave the golden file with it, not linger unchecked."""
    assert sorted(golden()) == sorted(SCENARIOS) or REGENERATE
