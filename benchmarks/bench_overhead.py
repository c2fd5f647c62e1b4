"""Per-task cost of otel_bgtasks, in units of one bare SDK span, measured side by side in one run.

    python benchmarks/bench_overhead.py            # about a minute
    python benchmarks/bench_overhead.py --quick    # fewer rounds, for a smoke run

Every arm runs the same loop: create a ``BackgroundTask`` and await it, N times, on one event loop.
The arms alternate round after round, and each figure is the median over rounds, so that a noisy
neighbour on a shared machine hits every arm alike. The unit is one bare span
(``start_as_current_span`` + end) on the same tracer provider and span processor, with a real SDK
``MeterProvider`` attached, as in production.

    overhead ratio = (instrumented task - uninstrumented task) / bare span
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import context, trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, NoOpTracerProvider, SpanContext, TraceFlags
from starlette.background import BackgroundTask, BackgroundTasks

import otel_bgtasks


class DiscardExporter(SpanExporter):
    """Exports nowhere: the cost measured is the instrumentation's and the SDK's, not a network's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def make_providers() -> tuple[TracerProvider, MeterProvider]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DiscardExporter(), max_queue_size=1 << 16))
    return tracer_provider, MeterProvider([InMemoryMetricReader()])


async def noop_async() -> None:
    pass


def noop_sync() -> None:
    pass


Arm = Callable[[int], Awaitable[float]]


def task_arm(func: Callable[[], Any], creating: context.Context | None = None) -> Arm:
    """Seconds per task: create a BackgroundTask in ``creating`` context, then run it."""

    async def run(n: int) -> float:
        token = context.attach(creating) if creating is not None else None
        try:
            started = time.perf_counter()
            for _ in range(n):
                await BackgroundTask(func)()
            return (time.perf_counter() - started) / n
        finally:
            if token is not None:
                context.detach(token)

    return run


def tasks_arm(func: Callable[[], Any], per_request: int) -> Arm:
    """Seconds per task, queued ``per_request`` at a time in a BackgroundTasks, as add_task does."""

    async def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n // per_request):
            tasks = BackgroundTasks()
            for _ in range(per_request):
                tasks.add_task(func)
            await tasks()
        return (time.perf_counter() - started) / (n // per_request * per_request)

    return run


def span_arm(tracer: trace.Tracer) -> Arm:
    async def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            with tracer.start_as_current_span("bare"):
                pass
        return (time.perf_counter() - started) / n

    return run


def unsampled_context() -> context.Context:
    parent = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    return trace.set_span_in_context(NonRecordingSpan(parent))


async def measure(arms: dict[str, tuple[Callable[[], None], Arm]], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per unit for each arm; ``setup`` (un)instruments before the arm runs."""
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, (setup, arm) in arms.items():
            setup()
            gc.collect()
            samples[name].append(await arm(n))
    otel_bgtasks.uninstrument()
    return {name: statistics.median(values) for name, values in samples.items()}


def instrumented(tracer_provider: TracerProvider, meter_provider: MeterProvider, **options: Any) -> Callable[[], None]:
    def setup() -> None:
        otel_bgtasks.uninstrument()
        otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)

    return setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n, rounds = (500, 5) if args.quick else (3000, 15)
    n_sync = n // 5  # a thread hop per task: fewer, or the run takes minutes

    tracer_provider, meter_provider = make_providers()
    tracer = tracer_provider.get_tracer("bench")
    plain = otel_bgtasks.uninstrument
    on = instrumented(tracer_provider, meter_provider)
    link = instrumented(tracer_provider, meter_provider, mode="link")
    everything = instrumented(
        tracer_provider, meter_provider, capture_args=True, timeout=60, continue_on_error=True, sentry=False
    )
    unsampled = unsampled_context()

    arms: dict[str, tuple[Callable[[], None], Arm]] = {
        "bare span": (plain, span_arm(tracer)),
        "async, uninstrumented": (plain, task_arm(noop_async)),
        "async, child": (on, task_arm(noop_async)),
        "async, link": (link, task_arm(noop_async)),
        "async, every option on": (everything, task_arm(noop_async)),
        "async, unsampled, uninstrumented": (plain, task_arm(noop_async, unsampled)),
        "async, unsampled, child": (on, task_arm(noop_async, unsampled)),
        "async x5 in BackgroundTasks, uninstrumented": (plain, tasks_arm(noop_async, 5)),
        "async x5 in BackgroundTasks, child": (on, tasks_arm(noop_async, 5)),
    }
    # Breakdown: the same task with one part of the pipeline swapped for the API's no-op.
    no_metrics = instrumented(tracer_provider, NoOpMeterProvider())
    no_spans = instrumented(NoOpTracerProvider(), meter_provider)
    neither = instrumented(NoOpTracerProvider(), NoOpMeterProvider())
    no_timer = instrumented(tracer_provider, meter_provider, blocking_threshold=None)
    arms.update(
        {
            "async, child, no-op meter": (no_metrics, task_arm(noop_async)),
            "async, child, no-op tracer": (no_spans, task_arm(noop_async)),
            "async, child, no-op tracer and meter": (neither, task_arm(noop_async)),
            "async, child, blocking timer off": (no_timer, task_arm(noop_async)),
        }
    )
    sync_arms: dict[str, tuple[Callable[[], None], Arm]] = {
        "bare span": (plain, span_arm(tracer)),
        "sync, uninstrumented": (plain, task_arm(noop_sync)),
        "sync, child": (on, task_arm(noop_sync)),
        "sync, link": (link, task_arm(noop_sync)),
    }
    results = asyncio.run(measure(arms, n, rounds))
    sync_results = asyncio.run(measure(sync_arms, n_sync, rounds))

    span = results["bare span"]
    rows = [
        ("async task, child (default)", results["async, child"], results["async, uninstrumented"], span, 1.5),
        ("async task, link", results["async, link"], results["async, uninstrumented"], span, 1.5),
        (
            "async task, every option on",
            results["async, every option on"],
            results["async, uninstrumented"],
            span,
            None,
        ),
        (
            "async task, request not sampled",
            results["async, unsampled, child"],
            results["async, unsampled, uninstrumented"],
            span,
            0.6,
        ),
        (
            "async task, 5 per BackgroundTasks",
            results["async x5 in BackgroundTasks, child"],
            results["async x5 in BackgroundTasks, uninstrumented"],
            span,
            1.5,
        ),
        (
            "sync task, child",
            sync_results["sync, child"],
            sync_results["sync, uninstrumented"],
            sync_results["bare span"],
            1.5,
        ),
        (
            "sync task, link",
            sync_results["sync, link"],
            sync_results["sync, uninstrumented"],
            sync_results["bare span"],
            1.5,
        ),
    ]
    base = results["async, uninstrumented"]
    full = results["async, child"] - base
    spans_part = results["async, child, no-op meter"] - results["async, child, no-op tracer and meter"]
    metrics_part = results["async, child, no-op tracer"] - results["async, child, no-op tracer and meter"]
    own_part = results["async, child, no-op tracer and meter"] - base
    timer_part = results["async, child"] - results["async, child, blocking timer off"]
    breakdown = [
        ("the task span (start, attributes, end)", spans_part),
        ("metrics (3 histograms, 2 observable counters)", metrics_part),
        ("otel_bgtasks itself (context capture, state, naming)", own_part),
        ("  of which the event-loop blocking timer", timer_part),
        ("sum of parts vs whole", (spans_part + metrics_part + own_part) / full if full else 0.0),
    ]
    print(f"Python {sys.version.split()[0]}, {n} async / {n_sync} sync tasks per arm, median of {rounds} rounds")
    print(f"{'case':40} {'overhead / bare span':>22} {'target':>8}  {'instrumented / plain task':>26}")
    for name, with_, without, unit, target in rows:
        ratio = (with_ - without) / unit
        verdict = "" if target is None else ("ok" if ratio <= target else "OVER")
        target_text = "-" if target is None else f"<= {target}"
        print(f"{name:40} {ratio:22.2f} {target_text:>8}  {with_ / without:26.2f} {verdict}")
    print()
    print("Where the default async task's cost goes, in bare spans:")
    for name, part in breakdown[:-1]:
        print(f"  {name:55} {part / span:6.2f}")
    print(f"  {breakdown[-1][0]:55} {breakdown[-1][1]:6.2f}")
    print(f"  one histogram record, 3 attributes {'':19} {histogram_cost(meter_provider) / span:6.2f}")
    print()
    print("Per-signal pieces, each timed alone, in bare spans:")
    for name, seconds in signal_costs(meter_provider).items():
        print(f"  {name:60} {seconds / span:6.2f}")
    return 0


def per_call(func: Callable[[], object], n: int = 20000) -> float:
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            func()
        samples.append((time.perf_counter() - started) / n)
    return statistics.median(samples)


def signal_costs(meter_provider: MeterProvider) -> dict[str, float]:
    """What each optional or per-task signal adds, measured on its own (not a sum of the whole)."""
    from otel_bgtasks.arguments import ArgumentCapture
    from otel_bgtasks.blocking import BlockingTimer
    from otel_bgtasks.metrics import TaskMetrics
    from otel_bgtasks.mistakes import creation_site
    from otel_bgtasks.naming import describe
    from otel_bgtasks.task_state import TaskState

    task_metrics = TaskMetrics(meter_provider)
    key = ("bench.noop_async", "async")
    capture = ArgumentCapture(256)
    loop = asyncio.new_event_loop()

    def timer_steps(n: int = 20000) -> float:
        async def run() -> float:
            started = time.perf_counter()
            for _ in range(n):
                await BlockingTimer(noop_async())
            return (time.perf_counter() - started) / n

        return loop.run_until_complete(run())

    costs = {
        "naming (cached per function)": per_call(lambda: describe(noop_async)),
        "dropped-task tracking: creation site + state with __del__": per_call(
            lambda: (creation_site(), TaskState(context.get_current(), 0, describe(noop_async)))
        ),
        "active + outcome counts (observable: dict updates)": per_call(
            lambda: (task_metrics.started(key), task_metrics.ended(key), task_metrics.count(*key, "success"))
        ),
        "context attach + detach around the task": per_call(
            lambda: context.detach(context.attach(trace.set_span_in_context(trace.INVALID_SPAN)))
        ),
        "event-loop blocking timer (a task with no await)": timer_steps() - per_call(lambda: noop_async().close()),
        "capture_args=True (2 positional, 1 keyword)": per_call(
            lambda: capture.render(noop_async, ("a@example.com", 3), {"password": "x"})
        ),
    }
    loop.close()
    return costs


def histogram_cost(meter_provider: MeterProvider, n: int = 20000) -> float:
    histogram = meter_provider.get_meter("bench").create_histogram("bench")
    attributes = {
        "code.function.name": "m.f",
        "background_task.outcome": "success",
        "background_task.execution": "async",
    }
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            histogram.record(0.001, attributes)
        samples.append((time.perf_counter() - started) / n)
    return statistics.median(samples)


if __name__ == "__main__":
    raise SystemExit(main())
