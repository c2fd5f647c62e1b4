"""Memory growth with otel_bgtasks: is it flat once the tasks have run, or been dropped?

    python benchmarks/bench_memory.py            # 2 to 4 minutes
    python benchmarks/bench_memory.py --quick    # a tenth of the tasks, for a smoke run

Each arm (uninstrumented, instrumented) runs in fresh processes, on a real SDK: a ``TracerProvider``
with a ``BatchSpanProcessor`` to an exporter that discards, and a ``MeterProvider`` with an
``InMemoryMetricReader``. A "request" opens a span, as the ASGI middleware would, queues 5 tasks
(a ``BackgroundTasks`` of 3 ``async def`` and 1 ``def`` tasks, plus a lone ``BackgroundTask``, as
``Response(background=...)`` takes), ends the span, then runs them, as Starlette does after the
response. Each task gets a fresh argument, so a task object kept alive would keep it alive too.

1. Ran: 10,000 tasks as warm-up, snapshot, 100,000 more, snapshot.
2. Dropped: the same requests, but the tasks are never run and go out of scope (otel_bgtasks logs a
   WARNING and counts ``outcome=dropped`` for each; the logger is silenced here).

Before each snapshot the span queue is flushed, metrics are collected and ``gc.collect()`` runs. One
process per arm reads resident memory (VmRSS) and the number of live GC-tracked objects; another
runs under tracemalloc, whose numbers are exact but would inflate the first's. Growth is printed in
KiB (or objects) per 10,000 tasks; flat means close to 0 and close to the uninstrumented arm.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.background import BackgroundTask, BackgroundTasks

import otel_bgtasks

ARMS = ("uninstrumented", "instrumented")
TASKS_PER_REQUEST = 5
NON_TRIVIAL_KIB_PER_10K = 16.0  # 1.6 bytes a task: far below any per-task object kept alive
TOP_SITES = 8


class DiscardExporter(SpanExporter):
    """Exports nowhere, counting task spans so the run can show the instrumented arm made them."""

    def __init__(self) -> None:
        self.task_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.task_spans += sum(1 for span in spans if span.name.startswith("BackgroundTask "))
        return SpanExportResult.SUCCESS


async def noop_async(payload: dict[str, int]) -> None:
    pass


def noop_sync(payload: dict[str, int]) -> None:
    pass


class Workload:
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self.serial = 0

    def queue(self) -> tuple[BackgroundTasks, BackgroundTask]:
        """What a route does: queue tasks while its request span is current."""
        self.serial += 1
        with self.tracer.start_as_current_span("GET /route"):
            tasks = BackgroundTasks()
            for index in range(3):
                tasks.add_task(noop_async, {"request": self.serial, "task": index})
            tasks.add_task(noop_sync, {"request": self.serial, "task": 3})
            lone = BackgroundTask(noop_async, {"request": self.serial, "task": 4})
        return tasks, lone

    async def run(self, n_tasks: int) -> None:
        for _ in range(n_tasks // TASKS_PER_REQUEST):
            tasks, lone = self.queue()
            await tasks()
            await lone()

    def drop(self, n_tasks: int) -> None:
        for _ in range(n_tasks // TASKS_PER_REQUEST):
            self.queue()  # never run: garbage as soon as it returns


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def dropped_counted(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    total = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != "background_task.outcomes":
                    continue
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    if point.attributes.get("background_task.outcome") == "dropped":
                        total += int(point.value)  # type: ignore[union-attr]
    return total


def child(arm: str, use_tracemalloc: bool, warmup: int, n: int, top: int, always_top: bool) -> dict[str, Any]:
    """One arm in this process: the ran phase, then the dropped phase; returns growths and sanity counts."""
    exporter = DiscardExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider([reader])
    if arm == "instrumented":
        otel_bgtasks.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    workload = Workload(tracer_provider.get_tracer("bench"))
    if use_tracemalloc:
        tracemalloc.start(4)

    def snapshot() -> dict[str, Any]:
        tracer_provider.force_flush()
        reader.get_metrics_data()  # a collection, as a periodic reader would make
        gc.collect()
        if use_tracemalloc:
            return {"traced": tracemalloc.get_traced_memory()[0], "snapshot": tracemalloc.take_snapshot()}
        return {"rss": rss_kib() * 1024, "objects": len(gc.get_objects())}

    def cyclic_garbage() -> int:
        return sum(generation["collected"] for generation in gc.get_stats())

    def growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        per_10k = 10_000 / n
        if not use_tracemalloc:
            return {
                "rss_kib": (after["rss"] - before["rss"]) / 1024 * per_10k,
                "objects": (after["objects"] - before["objects"]) * per_10k,
            }
        result: dict[str, Any] = {"traced_kib": (after["traced"] - before["traced"]) / 1024 * per_10k}
        if top and (always_top or abs(result["traced_kib"]) >= NON_TRIVIAL_KIB_PER_10K):
            result["sites"] = top_sites(before["snapshot"], after["snapshot"], top, per_10k)
        return result

    async def phases() -> dict[str, Any]:
        """Both phases on one event loop (and one worker thread pool), as in a server."""
        results: dict[str, Any] = {}
        await workload.run(warmup)
        before = snapshot()
        garbage = cyclic_garbage()
        await workload.run(n)
        garbage = cyclic_garbage() - garbage
        after = snapshot()
        results["ran"] = growth(before, after)
        results["ran"]["cyclic_garbage"] = garbage * 10_000 / n
        results["rss_after_warmup_kib"] = before.get("rss", 0) / 1024
        results["task_spans"] = exporter.task_spans
        del before, after

        logger = logging.getLogger("otel_bgtasks")
        logger.disabled = True  # one WARNING per dropped task, by design
        try:
            workload.drop(warmup)
            before = snapshot()
            garbage = cyclic_garbage()
            workload.drop(n)
            garbage = cyclic_garbage() - garbage
            after = snapshot()
        finally:
            logger.disabled = False
        results["dropped"] = growth(before, after)
        results["dropped"]["cyclic_garbage"] = garbage * 10_000 / n
        return results

    started = time.perf_counter()
    results = asyncio.run(phases())
    results["dropped_counted"] = dropped_counted(reader)
    results["seconds"] = time.perf_counter() - started
    tracer_provider.shutdown()
    return results


def top_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, limit: int, per_10k: float) -> list[str]:
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    diffs = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    lines = []
    for diff in sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:limit]:
        frames = " <- ".join(  # innermost first: the allocating line, then its callers
            f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}" for frame in reversed(diff.traceback)
        )
        lines.append(f"{diff.size_diff / 1024 * per_10k:+9.1f} KiB {diff.count_diff * per_10k:+9.0f} blocks  {frames}")
    return lines


def start_child(
    arm: str, use_tracemalloc: bool, warmup: int, n: int, top: int, always_top: bool
) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "_child", arm, "tracemalloc" if use_tracemalloc else "rss"]
    command += [str(warmup), str(n), str(top), str(int(always_top))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_children(warmup: int, n: int, top: int, always_top: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every (arm, mode) in its own process, all at once: memory figures do not depend on speed."""
    children = {
        (arm, traced): start_child(arm, traced, warmup, n, top, always_top) for arm in ARMS for traced in (False, True)
    }
    results: dict[tuple[str, bool], Any] = {}
    try:
        for key, process in children.items():
            stdout, stderr = process.communicate(timeout=1800)
            if stderr.strip():
                print(stderr, file=sys.stderr, end="")
            if process.returncode != 0:
                raise RuntimeError(f"{key[0]} child failed with {process.returncode}")
            results[key] = json.loads(stdout)
    finally:
        for process in children.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {arm: results[arm, False] for arm in ARMS}, {arm: results[arm, True] for arm in ARMS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=TOP_SITES, help="allocation sites to list on non-trivial growth")
    parser.add_argument("--always-top", action="store_true", help="list the top sites even when growth is trivial")
    args = parser.parse_args(argv)
    warmup, n = (1_000, 10_000) if args.quick else (10_000, 100_000)

    began = time.perf_counter()
    rss, traced = run_children(warmup, n, args.top, args.always_top)

    print(
        f"Python {sys.version.split()[0]}, {TASKS_PER_REQUEST} tasks per request "
        "(BackgroundTasks of 3 async + 1 def, plus a lone async BackgroundTask)"
    )
    elapsed = time.perf_counter() - began
    print(f"{warmup:,} tasks warm-up, then {n:,} measured, per phase and arm; {elapsed:.0f} s in all")
    print()
    print(f"{'growth per 10,000 tasks':44} {'uninstrumented':>15} {'instrumented':>13} {'difference':>11}")
    verdicts = []
    for phase in ("ran", "dropped"):
        rows = [
            ("RSS, KiB", rss, "rss_kib"),
            ("tracemalloc, KiB", traced, "traced_kib"),
            ("live GC-tracked objects", rss, "objects"),
            ("cyclic garbage freed by gc, objects", rss, "cyclic_garbage"),
        ]
        for label, source, key in rows:
            off, on = source["uninstrumented"][phase][key], source["instrumented"][phase][key]
            print(f"  {phase + ': ' + label:42} {off:15.1f} {on:13.1f} {on - off:+11.1f}")
        growth = traced["instrumented"][phase]["traced_kib"] - traced["uninstrumented"][phase]["traced_kib"]
        verdicts.append((phase, growth))
    print()
    instrumented_rss, instrumented_traced = rss["instrumented"], traced["instrumented"]
    runs = warmup + n
    print(
        f"check: task spans exported {instrumented_rss['task_spans']:,} and {instrumented_traced['task_spans']:,} "
        f"of {runs:,}; dropped tasks counted {instrumented_rss['dropped_counted']:,} and "
        f"{instrumented_traced['dropped_counted']:,} of {runs:,} (instrumented; the uninstrumented arm: "
        f"{rss['uninstrumented']['task_spans']} spans, {rss['uninstrumented']['dropped_counted']} dropped)"
    )
    print(
        "context: RSS after the warm-up, uninstrumented {:.1f} MiB, instrumented {:.1f} MiB".format(
            *(rss[arm]["rss_after_warmup_kib"] / 1024 for arm in ARMS)
        )
    )
    for phase, growth in verdicts:
        flat = abs(growth) < NON_TRIVIAL_KIB_PER_10K
        verdict = "flat" if flat else "GROWS"
        print(
            f"verdict, {phase}: {verdict} (tracemalloc, instrumented - uninstrumented: {growth:+.1f} KiB per 10,000 "
            f"tasks; non-trivial from {NON_TRIVIAL_KIB_PER_10K:g})"
        )
    for arm in ARMS:
        for phase in ("ran", "dropped"):
            sites = traced[arm][phase].get("sites")
            if sites:
                print()
                print(f"top allocation sites by growth, {arm}, {phase} (per 10,000 tasks; allocating frame first):")
                for line in sites:
                    print(f"  {line}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        arm, mode, warmup, n, top, always_top = sys.argv[2:8]
        print(json.dumps(child(arm, mode == "tracemalloc", int(warmup), int(n), int(top), always_top == "1")))
        raise SystemExit(0)
    raise SystemExit(main())
