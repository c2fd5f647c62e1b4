"""``OpenTelemetryMiddleware(app)`` served directly, as contrib's README sets it up: invisible to the server.

``app = OpenTelemetryMiddleware(Starlette(...))`` in a module, served as ``uvicorn module:app`` (and by
hypercorn and granian the same way), with and without ``otel_bgtasks.instrument()``: real server
processes on 127.0.0.1 answer the same, and what each server's loader detects (uvicorn calls the app
with no arguments to tell a factory, and picks the ASGI version from ``__call__``; hypercorn asks
``inspect.iscoroutinefunction``) is the same as uninstrumented. The request metrics still end with the
response there (issue 14): while a request's task is held, the request is no longer active, and its
duration, once recorded, is no longer than the client waited for the response.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from _servers import WAIT_SECONDS, closed_port, recording
from hypercorn.utils import is_asgi, wrap_app

import otel_bgtasks

MODULE = "direct_app"
APP_SOURCE = textwrap.dedent(
    '''
    """A Starlette app inside contrib's ASGI middleware, as contrib's README serves one; otel_bgtasks per MODE."""

    import os
    import threading

    import anyio
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    import otel_bgtasks

    MODE = os.environ.get("DIRECT_APP_MODE", "off")
    reader = InMemoryMetricReader()
    tracer_provider = TracerProvider()
    release = threading.Event()
    ran = []


    async def note():
        ran.append("note")


    async def held():
        await anyio.to_thread.run_sync(release.wait, 20)
        ran.append("held")


    async def home(request):
        name = request.query_params.get("name", "?")
        return PlainTextResponse(f"hello, {name}", headers={"x-app": "direct"}, background=BackgroundTask(note))


    async def hold(request):
        return PlainTextResponse("held", status_code=202, background=BackgroundTask(held))


    async def release_held(request):
        release.set()
        return PlainTextResponse("released")


    async def state(request):
        """Contrib's request metrics as the reader has them now, this request counted as active."""
        active, durations = 0, []
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "http.server.active_requests":
                        active += sum(point.value for point in metric.data.data_points)
                    elif metric.name in ("http.server.duration", "http.server.request.duration"):
                        scale = 1000 if metric.unit == "ms" else 1
                        for point in metric.data.data_points:
                            attributes = point.attributes
                            status = attributes.get("http.status_code", attributes.get("http.response.status_code"))
                            durations.append({"status": status, "count": point.count, "seconds": point.sum / scale})
        return JSONResponse({"active": active, "durations": durations, "ran": ran})


    routes = [Route("/", home), Route("/hold", hold), Route("/release", release_held), Route("/state", state)]
    if MODE == "instrument() first":
        otel_bgtasks.instrument(tracer_provider=tracer_provider)
    app = OpenTelemetryMiddleware(
        Starlette(routes=routes), tracer_provider=tracer_provider, meter_provider=MeterProvider([reader])
    )
    if MODE == "instrument(app) after":
        otel_bgtasks.instrument(app, tracer_provider=tracer_provider)
    '''
)

OFF = "off"
MODES = [OFF, "instrument() first", "instrument(app) after"]
BIN = Path(sys.executable).parent


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / f"{MODULE}.py").write_text(APP_SOURCE)
    return tmp_path


# -- Real servers, in processes of their own ---------------------------------------------------------


def server_argv(server: str, port: int) -> list[str]:
    target = f"{MODULE}:app"
    if server == "uvicorn":
        return [str(BIN / "uvicorn"), target, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
    if server == "hypercorn":
        return [str(BIN / "hypercorn"), target, "--bind", f"127.0.0.1:{port}"]
    return [str(BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), target]


@contextmanager
def server_process(server: str, app_dir: Path, mode: str) -> Iterator[tuple[str, Path]]:
    """``server module:app`` on a free port with otel_bgtasks per ``mode``: its URL and its log, once it answers."""
    port = closed_port()
    log = app_dir / f"{server}-{mode}.log".replace(" ", "_")
    env = {**os.environ, "DIRECT_APP_MODE": mode, "PYTHONPATH": str(app_dir)}
    env = {key: value for key, value in env.items() if not key.startswith("OTEL_")}
    with log.open("wb") as output:
        process = subprocess.Popen(
            server_argv(server, port),
            cwd=app_dir,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: granian's workers stop with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_SECONDS * 2
        while True:
            assert process.poll() is None, f"{server} exited:\n{log.read_text(errors='replace')}"
            try:
                httpx.get(url + "/state", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"{server} did not answer:\n{log.read_text(errors='replace')}"
                time.sleep(0.1)
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(WAIT_SECONDS)


def state(url: str) -> dict[str, Any]:
    """The server's request metrics, the ``/state`` request itself left out of the active count."""
    found = httpx.get(url + "/state", timeout=WAIT_SECONDS).json()
    found["active"] -= 1
    return found


def held_point(found: dict[str, Any]) -> dict[str, Any] | None:
    points = [point for point in found["durations"] if point["status"] == 202 and point["count"]]
    assert len(points) <= 1, found
    return points[0] if points else None


def serve_and_hold(url: str) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any], float, float]:
    """GET / (what the client sees), then a request whose task is held: metrics while held and after.

    Each request on a connection of its own: a server keeps a connection busy until the request's tasks end.
    """
    response = httpx.get(url + "/", params={"name": "otel"}, timeout=WAIT_SECONDS)
    seen = (response.status_code, response.text, response.headers["content-type"], response.headers.get("x-app"))
    sent = time.perf_counter()
    held = httpx.get(url + "/hold", timeout=WAIT_SECONDS)
    answered = time.perf_counter()
    assert held.status_code == 202
    during = state(url)
    released = time.perf_counter()
    assert httpx.get(url + "/release", timeout=WAIT_SECONDS).status_code == 200
    deadline = time.monotonic() + WAIT_SECONDS
    while held_point(after := state(url)) is None:  # recorded when the request's call is over, after its task
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    return seen, during, after, answered - sent, released - answered


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian"])
def test_served_directly_by_a_real_server(app_dir: Path, server: str) -> None:
    seen: dict[str, tuple[Any, ...]] = {}
    for mode in MODES:
        with server_process(server, app_dir, mode) as (url, log):
            seen[mode], during, after, waited, held_for = serve_and_hold(url)
        output = log.read_text(errors="replace")
        assert "Traceback" not in output and "Exception in ASGI application" not in output, output
        assert "factory" not in output.lower(), output  # uvicorn: "ASGI app factory detected"
        point = held_point(after)
        assert point is not None and after["active"] == 0
        assert after["ran"] == ["note", "held"]
        if mode == OFF:  # contrib's own: the request active while its task runs, and measured until it ends
            assert during["active"] == 1 and held_point(during) is None
            assert point["seconds"] >= held_for
        else:
            assert during["active"] == 0, (mode, during)
            assert point["seconds"] <= waited, (mode, point, waited)
    assert seen[MODES[1]] == seen[MODES[2]] == seen[OFF] == (200, "hello, otel", "text/plain; charset=utf-8", "direct")


# -- What a server's loader detects, in this process ---------------------------------------------------


def detected(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Import ``direct_app`` afresh and note what uvicorn's, hypercorn's and granian's loaders make of its app."""
    monkeypatch.syspath_prepend(str(app_dir))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    with recording("uvicorn.error") as uvicorn_log:
        config = uvicorn.Config(f"{MODULE}:app", log_config=None, lifespan="off")
        config.load()
    app = sys.modules[MODULE].app
    loaded, chain = config.loaded_app, []
    while loaded is not app:
        chain.append(type(loaded))
        loaded = loaded.app
    from granian._internal import load_target  # pyright: ignore[reportMissingTypeStubs]

    monkeypatch.delitem(sys.modules, MODULE)
    granian_app = load_target(f"{MODULE}:app", wd=app_dir)
    try:
        app()
    except TypeError as exc:
        called_bare: object = (type(exc), str(exc))
    else:
        called_bare = "no TypeError"
    cls = type(app)
    return {
        "uvicorn: factory detection": [record.getMessage() for record in uvicorn_log.records],
        "uvicorn: interface": config.interface,
        "uvicorn: wrappers": chain,
        "hypercorn: is_asgi": is_asgi(app),
        "hypercorn: wrapper": type(wrap_app(app, 1024, None)).__name__,
        "granian: loaded": type(granian_app).__qualname__,
        "app()": called_bare,
        "iscoroutinefunction(app)": inspect.iscoroutinefunction(app),
        "iscoroutinefunction(app.__call__)": inspect.iscoroutinefunction(app.__call__),
        "signature(app)": str(inspect.signature(app)),
        "signature(class)": str(inspect.signature(cls)),
        "__call__": cls.__call__,
        "__call__.__wrapped__ chain": list(iter_wrapped(cls.__call__)),
        'hasattr(class, "app")': hasattr(cls, "app"),
        "class attributes": sorted(vars(cls)),
        "instance attributes": sorted(vars(app)),
    }


def iter_wrapped(func: Any) -> Iterator[Any]:
    while func is not None:
        yield func
        func = getattr(func, "__wrapped__", None)


def test_what_a_servers_factory_detection_gets(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's ``app()`` must raise TypeError (else it takes the app for a factory), as uninstrumented."""
    seen: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        otel_bgtasks.uninstrument()
        monkeypatch.setenv("DIRECT_APP_MODE", mode)
        seen[mode] = detected(app_dir, monkeypatch)
    assert seen[OFF]["uvicorn: factory detection"] == []
    assert seen[OFF]["app()"][0] is TypeError
    assert seen[OFF]['hasattr(class, "app")'] is False
    for mode in MODES[1:]:
        assert seen[mode] == seen[OFF], mode
