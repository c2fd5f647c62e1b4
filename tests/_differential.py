"""The differential harness: one app, run uninstrumented and instrumented, and what the app and its server saw.

A :class:`Scenario` says how to build an app (framework, middleware stack, how the route hands its tasks
over) and which tasks its one route queues (:class:`Unit`: a task kind, an argument, whether it fails).
:func:`run_arm` builds that app afresh, optionally under ``otel_bgtasks.instrument`` with a real SDK
(in-memory span exporter and metric reader), optionally with sentry-sdk sending to a receiver on
127.0.0.1, sends one request straight to the ASGI app (or through real uvicorn) and returns an
:class:`Observed`: status, headers, body, the tasks' side effects in order, the exception that reached
the server and what the middleware saw of it, warnings, unraisable exceptions, log records other than
otel_bgtasks' own, Sentry events. :func:`probe_objects` does the same for copy, pickle and inspect of the
objects an app handles. Everything here is plain data so that the two arms compare with ``==``.

Documented differences are modelled, narrowly, by :func:`reference_scenario` (what the uninstrumented
app must be given to behave as documented for the instrumented one) and :func:`documented_warnings`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import gc
import inspect
import logging
import pickle
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import httpx
import pydantic
import sentry_sdk
from _sentry_endpoint import SentryEndpoint
from conftest import assert_originals_restored, sentry_set_aside
from fastapi import BackgroundTasks as FastAPIBackgroundTasks
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration
from starlette import background as starlette_background
from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import otel_bgtasks

# What the tasks did, in order, across threads: ("start" | "end" | "fail", unit name).
EFFECTS: list[tuple[str, str]] = []
_effects_lock = threading.Lock()


def record(what: str, name: str) -> None:
    with _effects_lock:
        EFFECTS.append((what, name))


class TaskFailed(Exception):
    """The app's own task failure."""


class AuditError(Exception):
    """What a translating middleware raises instead of the error it caught."""


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Order(pydantic.BaseModel):
    id: int
    email: str


class HostileRepr:
    """An argument whose repr raises: capture_args must not make that the app's problem."""

    def __repr__(self) -> str:
        raise RuntimeError("repr refused")


PAYLOADS: dict[str, Callable[[], Any]] = {
    "int": lambda: 7,
    "str": lambda: "alice@example.com",
    "dataclass": lambda: Point(1, 2),
    "pydantic": lambda: Order(id=3, email="bob@example.com"),
    "hostile_repr": HostileRepr,
    "none": lambda: None,
}


def _body(name: str, fail: str) -> None:
    """A task's work: note the start, then fail or note the end."""
    record("start", name)
    if fail == "raise":
        record("fail", name)
        raise TaskFailed(name)
    if fail == "soft":  # how the reference run stands for a failure continue_on_error does not re-raise
        record("fail", name)
        return
    record("end", name)


# -- task kinds ------------------------------------------------------------------------------------------


def sync_job(name: str, payload: Any, fail: str = "") -> None:
    _body(name, fail)


async def async_job(name: str, payload: Any, fail: str = "") -> None:
    await asyncio.sleep(0)
    _body(name, fail)


async def coro_job(name: str, payload: Any, fail: str = "") -> None:
    """Only ever queued as a coroutine object (the add_task(coro()) mistake)."""
    _body(name, fail)


async def held_job(name: str, payload: Any, fail: str = "") -> None:
    """Queued as a coroutine object that the route also awaits itself."""
    _body(name, fail)


@otel_bgtasks.task_options(timeout=0.05)
async def slow_job(name: str, payload: Any, fail: str = "") -> None:
    """Over its own timeout: otel_bgtasks cancels it (documented); uninstrumented it runs to the end.

    In reference runs ``fail="timeout"`` stands for the cancellation (``TimeoutError`` once started) and
    ``"timeout_soft"`` for it under continue_on_error (it just stops).
    """
    if fail in ("raise", "soft"):
        _body(name, fail)
        return
    record("start", name)
    if fail == "timeout":
        raise TimeoutError
    if fail == "timeout_soft":
        return
    await asyncio.sleep(0.2)
    record("end", name)


async def async_gen_job(name: str, payload: Any, fail: str = "") -> Any:
    _body(name, fail)
    yield


def wraps_sync(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def wraps_async(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


def plain_sync(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def plain_async(func: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


wrapped_sync_job = wraps_sync(sync_job)
wrapped_async_job = wraps_async(async_job)
plain_sync_job = plain_sync(sync_job)
plain_async_job = plain_async(async_job)
async_under_sync_wraps = wraps_sync(async_job)  # Starlette sees a def: the coroutine is never awaited
async_under_sync_plain = plain_sync(async_job)


class ClassJob:
    """A class used as a task: the work happens in ``__init__``."""

    def __init__(self, name: str, payload: Any, fail: str = "") -> None:
        _body(name, fail)


class CallableSync:
    def __call__(self, name: str, payload: Any, fail: str = "") -> None:
        _body(name, fail)


class CallableAsync:
    async def __call__(self, name: str, payload: Any, fail: str = "") -> None:
        await asyncio.sleep(0)
        _body(name, fail)


class Worker:
    def run(self, name: str, payload: Any, fail: str = "") -> None:
        _body(name, fail)

    async def arun(self, name: str, payload: Any, fail: str = "") -> None:
        await asyncio.sleep(0)
        _body(name, fail)

    static_sync = staticmethod(sync_job)


static_sync_job = staticmethod(sync_job)  # a raw staticmethod object: callable since Python 3.10
static_async_job = staticmethod(async_job)  # Starlette sees a sync callable: never awaited


async def adder(name: str, payload: Any, fail: str = "", *, tasks: Any) -> None:
    """Adds a follow-up task to its own BackgroundTasks, then works."""
    tasks.add_task(sync_job, name + "+", payload)
    _body(name, fail)


# Kinds whose body runs when Starlette runs the task (for kinds below, see NOT_RUN_KINDS and MISUSE_KINDS).
RUNNING_KINDS = (
    "sync",
    "async",
    "wraps_sync",
    "wraps_async",
    "plain_sync",
    "plain_async",
    "partial_sync",
    "partial_async",
    "class",
    "callable_sync",
    "callable_async",
    "bound_sync",
    "bound_async",
    "static_sync",
    "static_attr",
    "mock_sync",
    "mock_async",
    "nested",
    "adder",
)
# Starlette runs these as def tasks in the thread pool and drops what they return: the body never runs.
NOT_RUN_KINDS = ("async_under_sync_wraps", "async_under_sync_plain", "static_async", "async_gen")
# add_task given a coroutine object: Starlette fails with TypeError when it runs it.
MISUSE_KINDS = ("coroutine", "held_coroutine", "none")
TIMED_KINDS = ("slow",)
ALL_KINDS = RUNNING_KINDS + NOT_RUN_KINDS + MISUSE_KINDS + TIMED_KINDS


@dataclasses.dataclass(frozen=True)
class Unit:
    """One task the route queues."""

    name: str
    kind: str
    payload: str = "int"
    fail: str = ""  # "", "raise" (and "soft", "timeout", "timeout_soft" in reference runs)
    kwargs: bool = False  # arguments as keywords


def task_for(unit: Unit, tasks: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """What to pass to ``add_task`` for ``unit``: callable, positional and keyword arguments."""
    payload = PAYLOADS[unit.payload]()
    args: tuple[Any, ...] = (unit.name, payload)
    kwargs: dict[str, Any] = {"fail": unit.fail} if unit.fail else {}
    if unit.kwargs:
        args, kwargs = (), {"name": unit.name, "payload": payload, **kwargs}
    kind = unit.kind
    simple: dict[str, Any] = {
        "sync": sync_job,
        "async": async_job,
        "wraps_sync": wrapped_sync_job,
        "wraps_async": wrapped_async_job,
        "plain_sync": plain_sync_job,
        "plain_async": plain_async_job,
        "class": ClassJob,
        "callable_sync": CallableSync(),
        "callable_async": CallableAsync(),
        "bound_sync": Worker().run,
        "bound_async": Worker().arun,
        "static_sync": static_sync_job,
        "static_attr": Worker.static_sync,
        "async_under_sync_wraps": async_under_sync_wraps,
        "async_under_sync_plain": async_under_sync_plain,
        "static_async": static_async_job,
        "async_gen": async_gen_job,
        "slow": slow_job,
    }
    if kind in simple:
        return simple[kind], args, kwargs
    if kind == "partial_sync":
        return functools.partial(sync_job, unit.name), args[1:], kwargs if not unit.kwargs else _no_name(kwargs)
    if kind == "partial_async":
        return functools.partial(async_job, unit.name), args[1:], kwargs if not unit.kwargs else _no_name(kwargs)
    if kind == "mock_sync":
        return mock.Mock(side_effect=sync_job), args, kwargs
    if kind == "mock_async":
        return mock.AsyncMock(side_effect=async_job), args, kwargs
    if kind == "coroutine":
        return coro_job(*args, **kwargs), (), {}
    if kind == "none":
        return None, (), {}
    if kind == "held_coroutine":
        return held_job(*args, **kwargs), (), {}
    if kind == "adder":
        return adder, args, {**kwargs, "tasks": tasks}
    if kind == "nested":
        inner = BackgroundTasks()
        for index, inner_kind in enumerate(("sync", "async")):
            inner_unit = Unit(f"{unit.name}.{index}", inner_kind, unit.payload, unit.fail if index == 1 else "")
            func, inner_args, inner_kwargs = task_for(inner_unit, inner)
            inner.add_task(func, *inner_args, **inner_kwargs)
        return inner, (), {}
    raise AssertionError(kind)


def _no_name(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key != "name"}


def unit_names(unit: Unit) -> list[str]:
    """The names under which ``unit`` (and what it brings along) records its effects."""
    if unit.kind == "nested":
        return [f"{unit.name}.0", f"{unit.name}.1"]
    if unit.kind == "adder":
        return [unit.name, unit.name + "+"]
    return [unit.name]


# -- apps -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    """An app and the one request sent to it."""

    units: tuple[Unit, ...]
    framework: str = "starlette"  # starlette | fastapi | fastapi_contrib (instrument_app) | fastapi_native
    route_sync: bool = False  # FastAPI: a def route (run in the thread pool)
    delivery: str = "tasks"  # tasks | single (Response(background=BackgroundTask)) | both (and BackgroundTasks too)
    stack: tuple[str, ...] = ()  # outermost last: base_http | pure | translating | otel
    handler: bool = False  # an exception handler for TaskFailed
    raw_append: bool = False  # also tasks.tasks.append(functools.partial(sync_job, ...)) after the units


@dataclasses.dataclass
class Options:
    """How the instrumented arm is set up (None in place of Options: the uninstrumented arm)."""

    mode: str = "child"
    capture_args: bool = False
    continue_on_error: bool = False
    timeout: float | None = None
    with_app: bool = True  # instrument(app) rather than instrument()
    request_metrics_end_at_response: bool = True


class Telemetry:
    """A real SDK: spans to an in-memory exporter, metrics to an in-memory reader."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def task_spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith("BackgroundTask ")]

    def outcome_counts(self) -> dict[str, int]:
        """``background_task.outcomes`` summed per outcome."""
        data = self.reader.get_metrics_data()
        counts: dict[str, int] = {}
        if data is None:
            return counts
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if scope.scope.name != "otel_bgtasks" or metric.name != "background_task.outcomes":
                        continue
                    for point in metric.data.data_points:
                        outcome = str((point.attributes or {}).get("background_task.outcome"))
                        counts[outcome] = counts.get(outcome, 0) + int(point.value)
        return {k: v for k, v in counts.items() if v}


class SeenByMiddleware:
    """What the pure ASGI middleware observed: message types sent, the exception passing through."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.raw: Any = None  # the partial the route appended to tasks.tasks itself
        self.route_stack: list[str] = []  # modules of the frames the route runs under, server side up


class PureASGI:
    """A pure ASGI middleware that watches and passes everything through."""

    def __init__(self, app: Any, seen: SeenByMiddleware, translate: bool = False) -> None:
        self.app = app
        self.seen = seen
        self.translate = translate

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watched_send(message: Any) -> None:
            self.seen.events.append(("send", message["type"], message.get("status")))
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            self.seen.events.append(("raised", describe_exception(exc)))
            if self.translate:
                raise AuditError("audit failed") from None
            raise


async def _header_dispatch(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    response.headers["x-base"] = "1"
    return response


def stack_modules() -> list[str]:
    """The modules of the frames above the caller's: what the route runs under (middleware, the server)."""
    frame = sys._getframe(2)
    modules = []
    while frame is not None:
        modules.append(f"{frame.f_globals.get('__name__')}:{frame.f_code.co_name}")
        frame = frame.f_back
    return modules


def build_app(scenario: Scenario, seen: SeenByMiddleware, telemetry: Telemetry) -> tuple[Any, Any]:
    """The app to serve (stack included) and the inner Starlette/FastAPI app."""

    def queue(tasks: Any) -> Any:
        seen.route_stack = stack_modules()
        held: list[Any] = []
        for unit in scenario.units:
            func, args, kwargs = task_for(unit, tasks)
            if unit.kind == "held_coroutine":
                held.append(func)
            tasks.add_task(func, *args, **kwargs)
        if scenario.raw_append:
            seen.raw = functools.partial(async_job, "raw", 0)
            tasks.tasks.append(seen.raw)
        return held

    def single() -> BackgroundTask:
        func, args, kwargs = task_for(Unit("single", "sync"), None)
        return BackgroundTask(func, *args, **kwargs)

    inner: Any
    if scenario.framework == "starlette":

        async def endpoint(request: Request) -> Response:
            tasks = BackgroundTasks()
            for held in queue(tasks):
                await held
            if scenario.delivery == "tasks":
                return PlainTextResponse("queued", background=tasks)
            return PlainTextResponse("queued", background=single())

        handlers = {TaskFailed: _handled} if scenario.handler else {}
        inner = Starlette(routes=[Route("/run", endpoint)], exception_handlers=handlers)  # type: ignore[arg-type]
    else:
        kwargs: dict[str, Any] = {}
        if scenario.framework != "fastapi_native" and "telemetry" in inspect.signature(FastAPI).parameters:
            kwargs["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
        inner = FastAPI(**kwargs)
        if scenario.handler:
            inner.add_exception_handler(TaskFailed, _handled)  # type: ignore[arg-type]

        if scenario.route_sync:

            @inner.get("/run")
            def sync_route(background_tasks: FastAPIBackgroundTasks) -> Any:
                assert queue(background_tasks) == []  # held coroutines go to async routes only
                return _fastapi_result(scenario, single)

        else:

            @inner.get("/run")
            async def async_route(background_tasks: FastAPIBackgroundTasks) -> Any:
                for held in queue(background_tasks):
                    await held
                return _fastapi_result(scenario, single)

        if scenario.framework == "fastapi_contrib":
            FastAPIInstrumentor.instrument_app(
                inner, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
            )
    app: Any = inner
    for layer in scenario.stack:
        if layer == "base_http":
            app = BaseHTTPMiddleware(app, dispatch=_header_dispatch)
        elif layer in ("pure", "translating"):
            app = PureASGI(app, seen, translate=layer == "translating")
        elif layer == "otel":
            app = OpenTelemetryMiddleware(
                app, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
            )
        else:
            raise AssertionError(layer)
    return app, inner


def _fastapi_result(scenario: Scenario, single: Callable[[], BackgroundTask]) -> Any:
    if scenario.delivery == "tasks":
        return {"queued": True}
    # FastAPI keeps a returned Response's own background and drops the BackgroundTasks it injected.
    return JSONResponse({"queued": True}, background=single())


async def _handled(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("handled", status_code=418)


# -- what is observed ---------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def normalise(text: str) -> str:
    return _ADDRESS.sub(" at 0x…", text)


def describe_exception(exc: BaseException | None) -> Any:
    """An exception as the app and server see it: type, message, its own attributes, its chain."""
    if exc is None:
        return None
    chain = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(
            (
                f"{type(current).__module__}.{type(current).__qualname__}",
                normalise(str(current)),
                sorted(vars(current)),
                current.__suppress_context__,
            )
        )
        current = current.__cause__ or current.__context__
    return chain


@dataclasses.dataclass
class Observed:
    """Everything one arm saw, as plain data; ``telemetry`` is left out of comparisons."""

    status: int | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    effects: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    server_exception: Any = None
    middleware: list[Any] = dataclasses.field(default_factory=list)
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unraisable: list[str] = dataclasses.field(default_factory=list)
    logs: list[tuple[str, str, str, Any]] = dataclasses.field(default_factory=list)
    sentry: list[Any] = dataclasses.field(default_factory=list)
    raw_vars: Any = None  # vars() of the partial the route appended to tasks.tasks, after the run
    route_stack: list[str] = dataclasses.field(default_factory=list, compare=False)  # see stack_modules
    own_logs: list[str] = dataclasses.field(default_factory=list, compare=False, repr=False)
    telemetry: Telemetry | None = dataclasses.field(default=None, compare=False, repr=False)


class _Records(logging.Handler):
    """Keeps records as plain data at once: a record's exc_info would keep the tasks' frames alive."""

    def __init__(self, observed: Observed) -> None:
        super().__init__(logging.DEBUG)
        self.observed = observed
        # Weakly: a freed record's id is soon another's (on 3.13 nearly always), which an id set would drop.
        self.seen: weakref.WeakSet[logging.LogRecord] = weakref.WeakSet()

    def emit(self, record: logging.LogRecord) -> None:
        if record in self.seen:  # reached through both the root and the otel_bgtasks logger
            return
        self.seen.add(record)
        if record.name == "otel_bgtasks" or record.name.startswith("otel_bgtasks."):
            self.observed.own_logs.append(f"{record.levelname} {record.getMessage()}")
        elif not record.name.startswith(_NOISE_LOGGERS):
            exc = describe_exception(record.exc_info[1]) if record.exc_info else None
            self.observed.logs.append((record.name, record.levelname, normalise(record.getMessage()), exc))


@contextmanager
def observing(observed: Observed) -> Iterator[None]:
    """Warnings (all of them, recorded), unraisable exceptions and every log record, while open."""
    root = logging.getLogger()
    handler = _Records(observed)
    saved_level = root.level
    # Alone on the root logger: pytest's capture keeps every record, and a record's exc_info would keep the
    # app's frames (and the coroutines they hold) alive past the arm, hiding their "never awaited" warnings.
    saved_handlers = root.handlers[:]
    root.handlers = [handler]
    root.setLevel(logging.DEBUG)
    own = logging.getLogger("otel_bgtasks")
    own.addHandler(handler)  # in case a test set-up stops its propagation
    saved_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        observed.unraisable.append(f"{info.err_msg or 'Exception ignored in'}: {type(info.exc_value).__name__}")

    sys.unraisablehook = unraisable
    # Only what this arm made can be its garbage: a full collection then costs what the arm made, not the heap.
    gc.freeze()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                gc.collect()
        observed.warnings = [(w.category.__name__, normalise(str(w.message))) for w in caught]
    finally:
        gc.unfreeze()
        sys.unraisablehook = saved_hook
        root.handlers = saved_handlers
        own.removeHandler(handler)
        root.setLevel(saved_level)


# Loggers that chatter regardless of the app (asyncio's debug lines, sentry's HTTP client, urllib3).
_NOISE_LOGGERS = ("asyncio", "sentry_sdk.errors", "urllib3", "httpx", "httpcore")


async def drive(app: Any, observed: Observed) -> None:
    """Call the ASGI app as a server would and log what escapes it as uvicorn does."""
    response_done = asyncio.Event()
    request_sent = False
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            observed.status = message["status"]
            observed.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                response_done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/run",
        "raw_path": b"/run",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    try:
        await app(scope, receive, send)
    except Exception as exc:
        observed.server_exception = describe_exception(exc)
        logging.getLogger("uvicorn.error").error("Exception in ASGI application\n", exc_info=exc)
    observed.body = b"".join(body)


# -- Sentry ---------------------------------------------------------------------------------------------------


def sentry_summary(event: dict[str, Any]) -> Any:
    """An event as a reader of the Sentry project would tell it apart: its exceptions, or its message."""
    values = (event.get("exception") or {}).get("values") or []
    if values:
        # The root cause (Sentry lists the chain oldest first): otel_bgtasks reports a task's failure when
        # it happens, before Starlette chains it into "Caught handled exception" (one event either way).
        root = values[0]
        if root.get("type") == "CancelledError" and len(values) > 1:  # a timeout's context: see below
            root = values[1]
        return ("exception", (f"{root.get('module') or ''}.{root.get('type')}: {root.get('value')}",))
    return ("message", (event.get("logentry") or {}).get("message") or event.get("message"))


@contextmanager
def sentry_on(receiver: SentryEndpoint) -> Iterator[None]:
    with sentry_set_aside():  # the client found put back after, for whatever runs next
        sentry_sdk.init(
            dsn=receiver.dsn,
            integrations=[StarletteIntegration(), FastApiIntegration()],
            auto_enabling_integrations=False,
            default_integrations=True,
        )
        try:
            yield
        finally:
            sentry_sdk.flush(5)


# -- one arm ------------------------------------------------------------------------------------------------


def run_arm(
    scenario: Scenario,
    options: Options | None,
    *,
    sentry: SentryEndpoint | None = None,
    serve: Callable[[Any, Observed], None] | None = None,
) -> Observed:
    """Build the app of ``scenario``, instrument it per ``options`` (None: not at all), send one request."""
    assert_originals_restored()  # neither arm may inherit a patch of an earlier arm or test
    observed = Observed()
    telemetry = Telemetry()
    seen = SeenByMiddleware()
    EFFECTS.clear()
    if sentry is not None:
        sentry.events.clear()
    with observing(observed), sentry_on(sentry) if sentry is not None else _nothing():
        app, inner = build_app(scenario, seen, telemetry)
        if options is not None:
            served = otel_bgtasks.instrument(
                inner if options.with_app else None,
                tracer_provider=telemetry.tracer_provider,
                meter_provider=telemetry.meter_provider,
                mode=options.mode,  # type: ignore[arg-type]
                capture_args=options.capture_args,
                continue_on_error=options.continue_on_error,
                timeout=options.timeout,
                request_metrics_end_at_response=options.request_metrics_end_at_response,
            )
            assert served is None or served is inner
        try:
            if serve is None:
                asyncio.run(drive(app, observed))
            else:
                serve(app, observed)
        finally:
            if options is not None:
                otel_bgtasks.uninstrument()
            if scenario.framework == "fastapi_contrib":
                # Its patch of BackgroundTask.__call__ is process-wide and outlives the app: undone, so that the
                # next arm, uninstrumented or not, starts from plain Starlette (test_task_dying_with_its_loop_...).
                FastAPIInstrumentor.uninstrument_app(inner)
        del app, inner
    assert_originals_restored()
    observed.effects = list(EFFECTS)
    observed.middleware = seen.events
    observed.raw_vars = sorted(vars(seen.raw)) if seen.raw is not None else None
    observed.route_stack = seen.route_stack
    if sentry is not None:
        observed.sentry = sorted((sentry_summary(e) for e in sentry.events), key=repr)
    observed.telemetry = telemetry
    return observed


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# -- documented differences ---------------------------------------------------------------------------------


def reference_scenario(scenario: Scenario, options: Options | None) -> Scenario:
    """The scenario whose uninstrumented run is what the instrumented one must show, documented differences in.

    - ``task_options(timeout=...)`` (``slow_job``): the task is cancelled with ``TimeoutError`` (README, Options);
      uninstrumented it stands as a task that raises ``TimeoutError`` after its start.
    - ``continue_on_error=True``: a failing task is recorded and the tasks after it run; the failure is
      not re-raised (README, Options); uninstrumented it stands as a task that notes its failure and returns.
    """
    if options is None:
        return scenario
    units = []
    for unit in scenario.units:
        fail = unit.fail
        if options.continue_on_error and fail:
            fail = "soft"
        if unit.kind == "slow" and not fail:
            fail = "timeout_soft" if options.continue_on_error else "timeout"
        units.append(dataclasses.replace(unit, fail=fail))
    return dataclasses.replace(scenario, units=tuple(units))


_NEVER_AWAITED = re.compile(r"coroutine '(\w+)' was never awaited")


def documented_warnings(observed: list[tuple[str, str]], not_run: bool = False) -> list[tuple[str, str]]:
    """The uninstrumented warnings minus what README documents otel_bgtasks replaces.

    ``add_task(coro())``: Python's "coroutine ... was never awaited" RuntimeWarning is replaced by
    otel_bgtasks' ERROR at the add_task call (issue 18 §6, last item). Only for ``coro_job``, the function
    this harness queues as a coroutine object, so that a "never awaited" from anything else still counts.
    """
    kept = []
    for category, message in observed:
        match = _NEVER_AWAITED.search(message)
        if category == "RuntimeWarning" and match and match.group(1) == "coro_job":
            continue
        # The same for the coroutine a task whose body Starlette never runs returns (issue 18 §3): otel_bgtasks
        # reports that mistake and closes the coroutine; only with such a task (NOT_RUN_KINDS) in the app.
        if not_run and category == "RuntimeWarning" and match and match.group(1) == "async_job":
            continue
        kept.append((category, message))
    return kept


_CAUGHT_HANDLED = ".RuntimeError: Caught handled exception, but response already started."


def documented_sentry(events: list[Any]) -> list[Any]:
    """The uninstrumented Sentry events minus Starlette's wrapper of a task failure otel_bgtasks forwarded.

    Without otel_bgtasks sentry-sdk sometimes reports a task's failure twice (behind BaseHTTPMiddleware:
    its integration's event and uvicorn's log line); README promises one event per failure.

    With an exception handler for the task's error, Starlette re-raises it as "Caught handled exception,
    but response already started" (``from`` the task's exception); otel_bgtasks has reported the task's
    failure itself and drops that wrapper's event (issue 18 §6: "and Starlette's wrapper that chains it").
    """
    kept: list[Any] = []
    for event in events:
        if event == ("exception", (_CAUGHT_HANDLED,)):
            continue
        if event in kept and _is_task_failure(event):
            continue  # README: one event per failure (sentry-sdk alone may send a task's failure twice)
        kept.append(event)
    return kept


# What a task fails with here: its own error, a timeout, or Starlette's TypeError for add_task(coro()) / (None)
# (Starlette 0.27 calls what it was given: "'coroutine' object is not callable").
_TASK_FAILURES = (
    f"{TaskFailed.__module__}.TaskFailed: ",
    ".TimeoutError",
    ".TypeError: the first argument must be callable",
    ".TypeError: 'coroutine' object is not callable",
    ".TypeError: 'NoneType' object is not callable",
)


def _is_task_failure(event: Any) -> bool:
    kind, values = event
    return kind == "exception" and values[0].startswith(_TASK_FAILURES)


def documented_timeout_chain(chain: Any) -> Any:
    """An exception chain without the ``CancelledError`` a timeout's ``TimeoutError`` carries as context.

    ``task_options(timeout=...)`` cancels the task and raises ``TimeoutError`` (README, Options); like
    ``asyncio.timeout`` and anyio's ``fail_after`` its context is the cancellation it made. Wherever the
    ``TimeoutError`` sits in the chain: an outer middleware may translate it into the app's own error.
    """
    if not isinstance(chain, list):
        return chain
    return [
        link
        for index, link in enumerate(chain)
        if not (
            index > 0
            and link[0] == "asyncio.exceptions.CancelledError"
            and chain[index - 1][0] == "builtins.TimeoutError"
        )
    ]


def sentry_for_continue(reference: Observed, scenario: Scenario) -> list[Any]:
    """With continue_on_error a failure is not re-raised, so only otel_bgtasks reports it: one event each."""
    del reference
    if scenario.delivery != "tasks":
        return []
    events = [
        ("exception", (f"{TaskFailed.__module__}.TaskFailed: {name}",))
        for unit in scenario.units
        if unit.fail == "raise"
        for name in _failing_names(unit)
    ]
    events += [("exception", (".TimeoutError: ",)) for unit in scenario.units if unit.kind == "slow" and not unit.fail]
    return sorted(events, key=repr)


def _failing_names(unit: Unit) -> list[str]:
    return [f"{unit.name}.1"] if unit.kind == "nested" else [unit.name]


# -- telemetry invariants -------------------------------------------------------------------------------------


OUTCOMES_WITH_SPANS = {"success", "error", "skipped", "cancelled", "timeout"}


def expected_outcomes(scenario: Scenario, effects: list[tuple[str, str]], continue_on_error: bool) -> dict[str, int]:
    """Per outcome, how many tasks the instrumented run must count, from what the tasks did.

    A task that ended is a ``success``; one that failed an ``error`` (``timeout`` for ``slow_job``); one
    never reached because an earlier one failed is ``skipped``; a task whose body Starlette never runs
    (NOT_RUN_KINDS) or a coroutine object is an ``error`` (the add_task mistake), never a success; a task
    in a BackgroundTasks that never runs (not attached to the response, or a nested one skipped) is
    ``dropped``, with no span.
    """
    ended = {name for what, name in effects if what == "end"}
    failed = {name for what, name in effects if what == "fail"}
    started = {name for what, name in effects if what == "start"}
    counts: dict[str, int] = {}

    def add(outcome: str, count: int = 1) -> None:
        counts[outcome] = counts.get(outcome, 0) + count

    def run(units: list[tuple[str, str]]) -> bool:
        """Count ``(name, kind)`` units run in order by one BackgroundTasks; True if it stopped on a failure."""
        stopped = False
        for name, kind in units:
            if stopped:
                add("skipped", 3 if kind == "nested" else 1)  # a skipped nested BackgroundTasks: its tasks too
                continue
            if kind == "raw":  # not a BackgroundTask: run by Starlette's loop, no span of its own when it runs
                if name not in ended:
                    raise AssertionError(f"{name} did not run: {effects}")
                continue
            if kind == "nested":
                outcome = "error" if run([(f"{name}.0", "sync"), (f"{name}.1", "async")]) else "success"
            elif kind in NOT_RUN_KINDS or kind in MISUSE_KINDS:
                outcome = "error"
            elif name in ended:
                outcome = "success"
            elif name in failed:
                outcome = "error"
            elif kind == "slow" and name in started:
                outcome = "timeout"
            else:
                raise AssertionError(f"{name} ({kind}) neither ended nor failed: {effects}")
            add(outcome)
            # Starlette stops at an exception; a body it never ran raised nothing, so the tasks after it run.
            if outcome != "success" and kind not in NOT_RUN_KINDS and not continue_on_error:
                stopped = True
        return stopped

    units = [(u.name, u.kind) for u in scenario.units]
    if scenario.delivery == "tasks":
        follow_ups = [(u.name + "+", "sync") for u in scenario.units if u.kind == "adder" and u.name in started]
        raw = [("raw", "raw")] if scenario.raw_append else []
        run(units + raw + follow_ups)
    else:
        run([("single", "sync")])
        add("dropped", sum(3 if kind == "nested" else 1 for _, kind in units))
    return counts


# -- copy, pickle, inspect ---------------------------------------------------------------------------------------


def _attempt(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", action())
    except Exception as exc:
        return ("raised", (type(exc).__name__, normalise(str(exc))))


def _unwrap_chain(func: Any) -> list[str]:
    """The ``__wrapped__`` chain of ``func`` down to the function that does the work, by qualname and code."""
    chain = []
    for _ in range(10):
        code = getattr(func, "__code__", None)
        chain.append(f"{getattr(func, '__qualname__', type(func).__qualname__)}@{id(code) if code else None}")
        if not hasattr(func, "__wrapped__"):
            break
        func = func.__wrapped__
    return chain[-1:]  # where the chain ends: wrapt's class-level proxies add a link, not a different end


def probe_arm(kind: str, payload: str, instrumented: bool) -> dict[str, Any]:
    """:func:`probe_object` of the objects made for one task kind, with what the probing warned and printed."""
    observed = Observed()
    telemetry = Telemetry()
    with observing(observed):
        if instrumented:
            otel_bgtasks.instrument(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider)
        try:
            objects = objects_for(kind, payload)
            result: dict[str, Any] = {name: probe_object(obj) for name, obj in objects.items()}
            close_coroutines(objects)
            del objects
        finally:
            otel_bgtasks.uninstrument()
    result["warnings"] = observed.warnings
    result["unraisable"] = observed.unraisable
    result["logs"] = observed.logs
    return result


def probe_object(obj: Any) -> dict[str, Any]:
    """What copy, pickle, vars() and inspect make of ``obj``, as plain data."""
    result: dict[str, Any] = {}
    result["copy"] = _attempt(lambda: sorted(vars(copy.copy(obj))) if hasattr(obj, "__dict__") else "no dict")
    result["deepcopy"] = _attempt(lambda: sorted(vars(copy.deepcopy(obj))) if hasattr(obj, "__dict__") else "no dict")
    result["pickle"] = _attempt(lambda: sorted(vars(pickle.loads(pickle.dumps(obj)))))
    result["vars"] = sorted(vars(obj)) if hasattr(obj, "__dict__") else None
    result["iscoroutinefunction"] = inspect.iscoroutinefunction(obj)
    result["call_iscoroutinefunction"] = inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004
    result["signature"] = _attempt(lambda: str(inspect.signature(obj)))
    cls = type(obj)
    result["class_call_signature"] = _attempt(lambda: str(inspect.signature(cls.__call__)))
    result["class_call_iscoroutinefunction"] = inspect.iscoroutinefunction(cls.__call__)
    result["class_call_unwrapped"] = _unwrap_chain(cls.__call__)
    result["class_init_unwrapped"] = _unwrap_chain(cls.__init__)
    result["class_dir"] = sorted(name for name in dir(cls) if not name.startswith("__"))
    return result


def call_with_no_arguments(app: Any) -> Any:
    """What a server's factory detection gets: uvicorn calls the app with no arguments, expects TypeError."""

    def call() -> Any:
        returned = app()
        kind = type(returned).__name__
        if inspect.iscoroutine(returned):
            returned.close()
        return kind

    return _attempt(call)


def call_with_wrong_arguments() -> dict[str, Any]:
    """Starlette's own callables, given an argument they do not take, or none where one is needed."""

    def settle(returned: Any) -> str:
        kind = type(returned).__name__
        if inspect.iscoroutine(returned):
            returned.close()
        return kind

    job = functools.partial(sync_job, "wrong", 0)
    return {
        "BackgroundTask(job)('x')": _attempt(lambda: settle(BackgroundTask(job)("x"))),  # type: ignore[call-arg]
        "BackgroundTasks()('x')": _attempt(lambda: settle(BackgroundTasks()("x"))),  # type: ignore[call-arg]
        "run_in_threadpool()": _attempt(lambda: settle(starlette_background.run_in_threadpool())),  # type: ignore[call-arg]
        "BackgroundTask()": _attempt(lambda: settle(BackgroundTask())),  # type: ignore[call-arg]
    }


def objects_for(kind: str, payload: str) -> dict[str, Any]:
    """The objects an app handles for one task kind: a BackgroundTask, a BackgroundTasks, FastAPI's."""
    unit = Unit("probe", kind, payload)
    tasks = BackgroundTasks()
    func, args, kwargs = task_for(unit, tasks)
    objects: dict[str, Any] = {"BackgroundTask": BackgroundTask(func, *args, **kwargs)}
    tasks.add_task(*task_for(unit, tasks)[:1], *args, **kwargs)
    objects["BackgroundTasks"] = tasks
    fastapi_tasks = FastAPIBackgroundTasks()
    fastapi_tasks.add_task(*task_for(unit, fastapi_tasks)[:1], *args, **kwargs)
    objects["fastapi.BackgroundTasks"] = fastapi_tasks
    return objects


def close_coroutines(objects: dict[str, Any]) -> None:
    """The coroutine objects a probe queued never run: close them so that only the arm's own warn."""
    for obj in objects.values():
        tasks = [obj] if isinstance(obj, BackgroundTask) else getattr(obj, "tasks", [])
        funcs = [getattr(task, "func", None) for task in tasks]
        for func in funcs:
            if inspect.iscoroutine(func):
                func.close()


async def no_op() -> None:
    pass


def serve_with_uvicorn(app: Any, observed: Observed) -> None:
    """Serve ``app`` with real uvicorn on 127.0.0.1 and send the request over a socket.

    The outermost layer notes when the app's call has returned (its background tasks included), so the
    arm waits for the tasks before uvicorn stops.
    """
    from _servers import serving

    finished = threading.Event()

    class Finished:
        """Marks the end of the app's call; itself invisible to what is compared."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                if scope["type"] == "http":
                    finished.set()

    # uvicorn's factory detection calls what it is given with no arguments: give it the app itself,
    # as `uvicorn module:app` would, and watch the end of the call from inside uvicorn's own wrapper.
    with serving(app, lifespan="off", log_config=None, log_level="warning") as server:
        loaded = server.server.config.loaded_app
        inner_app = getattr(loaded, "app", None)
        if inner_app is not None:
            loaded.app = Finished(inner_app)
        # The connection stays open until the app's call has ended, as a keep-alive client's does. Closed once
        # the body is read, it raced the tasks: a disconnect cancels Starlette 0.27's BaseHTTPMiddleware stream,
        # and with it the re-raise of a task's failure, more often in the slower arm.
        with httpx.Client(timeout=10) as client:
            response = client.get(server.url + "/run")
            if not finished.wait(10 if inner_app is not None else 0):
                _wait_for_quiet_effects()  # no hook in this uvicorn: the tasks have ended once nothing moves
    observed.status = response.status_code
    observed.headers = sorted((k, v) for k, v in response.headers.items() if k not in ("date", "server"))
    observed.body = response.content


def _wait_for_quiet_effects(quiet: float = 0.5, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    seen = -1
    while time.monotonic() < deadline:
        with _effects_lock:
            count = len(EFFECTS)
        if count == seen:
            return
        seen = count
        time.sleep(quiet)
