"""What head sampling does to task spans (README, "Sampling"), with the SDK's own samplers.

Child mode: a task span follows its creator's decision, and the sampler is not asked again. Link mode:
each task trace is a new root, decided on its own, the sampler seeing the task's start attributes and the
link to its creator. Either way the metrics count every task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from _metrics import metrics_by_name, points
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes
from starlette.background import BackgroundTasks

import otel_bgtasks


class TasksOnly(Sampler):
    """Samples root spans of background tasks only, and keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, Any], list[Link]]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self.asked.append((name, dict(attributes or {}), list(links or ())))
        decision = Decision.RECORD_AND_SAMPLE if name.startswith("BackgroundTask ") else Decision.DROP
        return SamplingResult(decision, attributes)

    def get_description(self) -> str:
        return "TasksOnly"


def send_welcome_email(address: str) -> None:
    pass


async def run_in_unsampled_request(sampler: Sampler, mode: str) -> tuple[InMemorySpanExporter, InMemoryMetricReader]:
    """A task queued inside a request span that ``sampler`` does not sample, then run."""
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_bgtasks.instrument(tracer_provider=provider, meter_provider=MeterProvider([reader]), mode=mode)
    tasks = BackgroundTasks()
    with provider.get_tracer("app").start_as_current_span("POST /signup", kind=SpanKind.SERVER) as request:
        assert not request.get_span_context().trace_flags.sampled
        tasks.add_task(send_welcome_email, "ada@example.com")
    await tasks()
    return exporter, reader


def successes(reader: InMemoryMetricReader) -> int:
    outcomes = points(metrics_by_name(reader)["background_task.outcomes"])
    return sum(p.value for attrs, p in outcomes.items() if ("background_task.outcome", "success") in attrs)


async def test_child_mode_follows_the_request_and_the_metrics_still_count() -> None:
    sampler = TasksOnly()
    exporter, reader = await run_in_unsampled_request(ParentBased(root=sampler), "child")
    # No span at all: the task span would have been a child of an unsampled span, and is not asked about.
    assert exporter.get_finished_spans() == ()
    assert [name for name, _, _ in sampler.asked] == ["POST /signup"]
    assert successes(reader) == 1


async def test_link_mode_task_traces_are_decided_on_their_own() -> None:
    sampler = TasksOnly()
    exporter, reader = await run_in_unsampled_request(ParentBased(root=sampler), "link")
    (task,) = exporter.get_finished_spans()
    assert task.name == "BackgroundTask send_welcome_email" and task.parent is None
    # Asked as a root, with the task's start attributes and the link to the unsampled request span.
    ((name, attributes, links),) = [asked for asked in sampler.asked if asked[0] != "POST /signup"]
    assert name == task.name
    assert attributes["code.function.name"] == f"{__name__}.send_welcome_email"
    assert attributes["background_task.execution"] == "threadpool"
    ((link,),) = [links]
    assert link.context == task.links[0].context and not link.context.trace_flags.sampled
    assert task.context.trace_id != link.context.trace_id
    assert successes(reader) == 1


async def test_link_mode_task_trace_dropped_by_its_own_decision_is_still_counted() -> None:
    exporter, reader = await run_in_unsampled_request(ParentBased(root=ALWAYS_OFF), "link")
    assert exporter.get_finished_spans() == ()
    assert successes(reader) == 1
