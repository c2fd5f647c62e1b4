"""End to end: what otel_bgtasks costs a client of a real uvicorn server, as ratios measured side by side.

    python benchmarks/bench_load.py            # about 2 minutes
    python benchmarks/bench_load.py --quick    # fewer, shorter rounds, for a smoke run
    python benchmarks/bench_load.py --client httpx --concurrency 32

Both arms serve the same FastAPI app from a uvicorn server on 127.0.0.1, each in its own process:
OpenTelemetry's ASGI middleware for request spans, an SDK ``TracerProvider`` with a
``BatchSpanProcessor`` to an exporter that discards, an SDK ``MeterProvider`` with a periodic reader
to an exporter that discards, and FastAPI's native telemetry off, so both arms have the same request
spans. The instrumented arm also calls ``otel_bgtasks.instrument(app, ...)``. The routes queue 1
(async) or 5 (4 async, 1 ``def``) no-op background tasks per request.

A load generator in a third process keeps a fixed number of requests in flight on keep-alive
connections, warms up, then sends requests for a fixed time and reports requests/s and the latency
percentiles a client sees: its response arrives before the tasks run, but uvicorn keeps the
connection busy until they end, so the next request on that connection waits for them. It also reads
the server's CPU time from /proc over the same window; the server reports its time in the garbage
collector. The client is a minimal asyncio HTTP/1.1 client by default: ``httpx.AsyncClient``
(``--client httpx``) spends more CPU per request than the server, so on a small machine it saturates
first and both arms look alike.

Each round starts a fresh server per arm and loads them in turn, the first arm swapped every round;
each figure is the median over rounds, so that a noisy neighbour on a shared machine hits both arms
alike. The headline is instrumented / uninstrumented.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import BackgroundTasks  # at module level: the routes' string annotations resolve here

ARMS = ("uninstrumented", "instrumented")
SCENARIOS = {"1 task/request": "/tasks/1", "5 tasks/request": "/tasks/5"}
TASKS_PER_REQUEST = {"/tasks/1": 1, "/tasks/5": 5}
# Issue 12's targets: requests/s instrumented / uninstrumented.
TARGETS = {"1 task/request": 0.95, "5 tasks/request": 0.70}
START_SECONDS = 30.0
STOP_SECONDS = 15.0


# -- the server (child process) ---------------------------------------------------------------------


def make_app(arm: str) -> tuple[Any, Any]:
    """The app both arms serve, and the span exporter that counts what it discards."""
    from fastapi import FastAPI
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        MetricsData,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    import otel_bgtasks

    class DiscardSpans(SpanExporter):
        """Exports nowhere, counting spans so the parent can check both arms did the same work."""

        def __init__(self) -> None:
            self.spans = 0
            self.task_spans = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.spans += len(spans)
            self.task_spans += sum(1 for span in spans if span.name.startswith("BackgroundTask "))
            return SpanExportResult.SUCCESS

    class DiscardMetrics(MetricExporter):
        def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **_: Any) -> MetricExportResult:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            pass

    exporter = DiscardSpans()
    gc_seconds = [0.0, 0.0]  # total, start of the collection under way

    def time_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_seconds[1] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_seconds[1]

    gc.callbacks.append(time_gc)
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = MeterProvider([PeriodicExportingMetricReader(DiscardMetrics(), export_interval_millis=5000)])

    kwargs: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:  # FastAPI >= 0.163: native spans off in both arms
        kwargs["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(**kwargs)

    async def noop_async() -> None:
        pass

    def noop_sync() -> None:
        pass

    @app.get("/tasks/1")
    async def one_task(background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(noop_async)
        return {"tasks": 1}

    @app.get("/tasks/5")
    async def five_tasks(background_tasks: BackgroundTasks) -> dict[str, int]:
        for _ in range(4):
            background_tasks.add_task(noop_async)
        background_tasks.add_task(noop_sync)
        return {"tasks": 5}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        tracer_provider.force_flush()
        return {
            "spans": exporter.spans,
            "task_spans": exporter.task_spans,
            "gc_seconds": gc_seconds[0],
            "full_collections": gc.get_stats()[2]["collections"],
        }

    app.add_middleware(
        OpenTelemetryMiddleware,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls="health,stats",
    )
    if arm == "instrumented":
        app = otel_bgtasks.instrument(app, tracer_provider=tracer_provider, meter_provider=meter_provider)
    middleware = [m for m in app.user_middleware if m.cls is OpenTelemetryMiddleware]
    assert len(middleware) == 1, f"{arm}: expected one request-span middleware, got {len(middleware)}"
    return app, exporter


def serve(arm: str, fd: int) -> int:
    """Serve the ``arm`` app on the listening socket inherited as ``fd`` until SIGINT/SIGTERM."""
    import uvicorn

    app, _ = make_app(arm)
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it shut down for
        uvicorn.Server(config).run(sockets=[sock])
    return 0


# -- the load generator (child process) -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, every thread included."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Get = Callable[[], Awaitable[int]]  # one GET on this worker's connection; returns the status code


@asynccontextmanager
async def httpx_connections(url: str, concurrency: int) -> AsyncIterator[Callable[[], Get]]:
    """httpx.AsyncClient with one keep-alive connection per worker."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        def connect() -> Get:
            async def get() -> int:
                return (await client.get(url)).status_code

            return get

        yield connect


@asynccontextmanager
async def raw_connections(url: str, concurrency: int) -> AsyncIterator[Callable[[], Get]]:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per worker, GET only.

    A tenth of httpx's CPU per request, so that the server, not the client, is what saturates.
    """
    parsed = urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    request = f"GET {parsed.path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []

    def connect() -> Get:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

        async def get() -> int:
            nonlocal streams
            if streams is None:
                streams = await asyncio.open_connection(host, port)
                writers.append(streams[1])
            reader, writer = streams
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            return status

        return get

    try:
        yield connect
    finally:
        for writer in writers:
            writer.close()


CLIENTS = {"raw": raw_connections, "httpx": httpx_connections}


async def generate(
    client: str, url: str, concurrency: int, warmup: float, duration: float, server_pid: int
) -> dict[str, Any]:
    """Keep ``concurrency`` requests in flight for ``warmup`` + ``duration`` s; measure the second part."""
    latencies: list[float] = []
    sent = 0
    failures = 0
    last_end = 0.0
    async with CLIENTS[client](url, concurrency) as connect:
        started = time.perf_counter()
        window_start = started + warmup
        window_end = window_start + duration
        server_cpu_start = client_cpu_start = 0.0

        async def mark_window() -> None:
            nonlocal server_cpu_start, client_cpu_start
            await asyncio.sleep(window_start - time.perf_counter())
            server_cpu_start, client_cpu_start = cpu_seconds(server_pid), time.process_time()

        async def worker() -> None:
            nonlocal sent, failures, last_end
            get = connect()
            while (begin := time.perf_counter()) < window_end:
                status = await get()
                end = time.perf_counter()
                sent += 1
                if status != 200:
                    failures += 1
                if begin >= window_start:
                    latencies.append(end - begin)
                    last_end = max(last_end, end)

        await asyncio.gather(mark_window(), *(worker() for _ in range(concurrency)))
        server_cpu = cpu_seconds(server_pid) - server_cpu_start
        client_cpu = time.process_time() - client_cpu_start
    elapsed = last_end - window_start
    percentiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "rps": len(latencies) / elapsed,
        "p50": percentiles[49],
        "p99": percentiles[98],
        "requests": len(latencies),
        "sent": sent,
        "failures": failures,
        "server_cpu_per_request": server_cpu / len(latencies),
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_share": client_cpu / elapsed,
    }


# -- the orchestrator -------------------------------------------------------------------------------


class Server:
    """One arm's uvicorn process, on a socket bound here so its port is known before it starts."""

    def __init__(self, arm: str) -> None:
        self.arm = arm
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "_serve", arm, str(sock.fileno())], pass_fds=[sock.fileno()]
            )
        finally:
            sock.close()  # the child has its own copy

    def wait_ready(self) -> None:
        """Poll /health until it answers (the socket already listens: a request waits until uvicorn accepts)."""
        import httpx

        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.arm} server exited with {self.process.returncode} during start")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.arm} server did not answer within {START_SECONDS:g} s")

    def stats(self) -> dict[str, float]:
        """Spans exported (after a flush) and time in the garbage collector, since the server started."""
        import httpx

        return httpx.get(self.url + "/stats", timeout=10.0).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL, each waited for."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            if self.process.poll() is not None:
                return
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_SECONDS)
                return
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_SECONDS)


def run_load(
    server: Server, path: str, client: str, concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "_load",
        client,
        server.url + path,
        str(concurrency),
        str(warmup),
        str(duration),
        str(server.process.pid),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=warmup + duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    if result["failures"]:
        raise RuntimeError(f"{server.arm} {path}: {result['failures']} responses were not 200")
    return result


def check_spans(server: Server, sent: dict[str, int]) -> dict[str, float]:
    """Spans per request from this server's exporter; task spans must be exactly as many as tasks run."""
    stats = server.stats()
    requests = sum(sent.values())
    tasks = sum(TASKS_PER_REQUEST[path] * count for path, count in sent.items())
    expected = tasks if server.arm == "instrumented" else 0
    if stats["task_spans"] != expected:
        print(
            f"WARNING: {server.arm}: {stats['task_spans']} task spans exported for {tasks} tasks run",
            file=sys.stderr,
        )
    return {
        "request_spans": (stats["spans"] - stats["task_spans"]) / requests,
        "task_spans": stats["task_spans"] / requests,
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="raw",
        help="raw: minimal asyncio HTTP/1.1 client (default; the server saturates first); "
        "httpx: httpx.AsyncClient (the client saturates first on a small machine)",
    )
    args = parser.parse_args(argv)
    rounds, warmup, duration = (2, 0.5, 1.5) if args.quick else (5, 1.0, 4.0)

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {s: {arm: [] for arm in ARMS} for s in SCENARIOS}
    spans: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    began = time.monotonic()
    for round_ in range(rounds):
        order = ARMS if round_ % 2 == 0 else ARMS[::-1]
        servers = {arm: Server(arm) for arm in order}
        try:
            for server in servers.values():
                server.wait_ready()
            sent: dict[str, dict[str, int]] = {arm: {} for arm in ARMS}
            for scenario, path in SCENARIOS.items():
                for arm in order:
                    before = servers[arm].stats()
                    result = run_load(servers[arm], path, args.client, args.concurrency, warmup, duration)
                    after = servers[arm].stats()
                    result["gc_per_request"] = (after["gc_seconds"] - before["gc_seconds"]) / result["sent"]
                    full = after["full_collections"] - before["full_collections"]
                    result["full_gc_per_1000"] = full * 1000 / result["sent"]
                    samples[scenario][arm].append(result)
                    sent[arm][path] = result["sent"]
            for arm, server in servers.items():
                spans[arm].append(check_spans(server, sent[arm]))
            for server in servers.values():
                server.stop()
        finally:
            for server in servers.values():
                server.kill()

    import fastapi
    import uvicorn

    print(
        f"Python {sys.version.split()[0]}, FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__} "
        f"({loop_and_http()}), {os.cpu_count()} CPUs"
    )
    print(
        f"concurrency {args.concurrency}, {warmup:g} s warm-up + {duration:g} s measured per arm, "
        f"median of {rounds} rounds, {time.monotonic() - began:.0f} s in all"
    )
    print()
    header = f"{'requests/s':>10} {'target':>8} {'p50':>6} {'p99':>6} {'server CPU/req':>15}"
    print(f"{'instrumented / uninstrumented':30} {header}")
    for scenario in SCENARIOS:
        on, off = samples[scenario]["instrumented"], samples[scenario]["uninstrumented"]

        def ratio(key: str, on: list[dict[str, Any]] = on, off: list[dict[str, Any]] = off) -> float:
            return median([r[key] for r in on]) / median([r[key] for r in off])

        rps = ratio("rps")
        verdict = "ok" if rps >= TARGETS[scenario] else "UNDER"
        target = f">= {TARGETS[scenario]:.2f}"
        print(
            f"{scenario:30} {rps:10.3f} {target:>8} {ratio('p50'):6.3f} {ratio('p99'):6.3f} "
            f"{ratio('server_cpu_per_request'):15.3f} {verdict}"
        )
    print()
    print("Spread: requests/s ratio of each round's pair (instrumented / uninstrumented)")
    for scenario in SCENARIOS:
        on, off = samples[scenario]["instrumented"], samples[scenario]["uninstrumented"]
        pairs = [a["rps"] / b["rps"] for a, b in zip(on, off, strict=True)]
        print(f"  {scenario:28} " + " ".join(f"{p:.3f}" for p in pairs))
    print()
    print("Context (medians per arm; absolute values vary with the machine, compare only within a row pair)")
    print(
        f"  {'scenario, arm':36} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'server CPU':>10} {'client CPU':>10} "
        f"{'µs CPU/req':>10} {'µs GC/req':>9} {'full GCs/1k req':>15}"
    )
    for scenario in SCENARIOS:
        for arm in ARMS:
            rows = samples[scenario][arm]

            def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return median([r[key] for r in rows])

            print(
                f"  {scenario + ', ' + arm:36} {med('rps'):8.0f} {med('p50') * 1e3:7.2f} {med('p99') * 1e3:7.2f} "
                f"{med('server_cpu_share'):9.0%} {med('client_cpu_share'):10.0%} "
                f"{med('server_cpu_per_request') * 1e6:10.0f} {med('gc_per_request') * 1e6:9.0f} "
                f"{med('full_gc_per_1000'):15.2f}"
            )
    for arm in ARMS:
        request_spans = median([s["request_spans"] for s in spans[arm]])
        task_spans = median([s["task_spans"] for s in spans[arm]])
        print(f"  spans per request, {arm:16} request spans {request_spans:.2f}, task spans {task_spans:.2f}")
    return 0


def loop_and_http() -> str:
    """What uvicorn picks for loop="auto" and http="auto" here."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop}, {http}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        raise SystemExit(serve(sys.argv[2], int(sys.argv[3])))
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        client, url, concurrency, warmup, duration, pid = sys.argv[2:8]
        result = asyncio.run(generate(client, url, int(concurrency), float(warmup), float(duration), int(pid)))
        print(json.dumps(result))
        raise SystemExit(0)
    raise SystemExit(main())
