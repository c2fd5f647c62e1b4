"""Request metrics that end with the response, not with the background tasks run after it.

Contrib's ASGI ``OpenTelemetryMiddleware`` (the request instrumentation ``instrument(app)`` adds, and
the one opentelemetry-instrumentation-fastapi and -starlette use) records ``http.server.duration`` /
``http.server.request.duration`` and takes the request off ``http.server.active_requests`` in a
``finally`` after ``await self.app(...)`` returns; Starlette runs background tasks inside that call,
after the response, so the request is measured until its last task ends
(opentelemetry-python-contrib#3591; its span already ends with the last body chunk).

The fix copies none of contrib's code: the app's coroutine is run in two parts. Contrib's
``await self.app(...)`` returns as soon as the response is complete (the last body chunk, or the client
gone once the response has started), so contrib records its metrics, with its own code and attributes,
at that moment. The rest of the app (the background tasks, and whatever middleware does after them)
then runs in the same task, in the same context, before the middleware's call returns to the server:
the server, Starlette and the tasks see the same task, the same order and the same exceptions. A
request with no background task ends with its response anyway and records what it always did.

Two patches on contrib's class, both undone by :func:`remove`:

- ``OpenTelemetryMiddleware.__call__`` (wrapt) sets up the split and, once contrib's call has returned,
  runs the rest of the app;
- a class attribute ``OpenTelemetryMiddleware.app`` reads and writes each instance's own ``app``, except
  that for the one call set up above it hands contrib a stand-in that returns at the response's end.

A contrib release that already ends these metrics at the response (the fix proposed for #3591 moves
only the duration) is detected by serving it one request at :func:`install`, and left alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from otel_bgtasks.guard import capture_internal_exceptions, internal_error

_logger = logging.getLogger("otel_bgtasks")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]

# Contrib's request metrics: the old and the new semantic conventions' durations, and the active count.
DURATIONS: Final = ("http.server.duration", "http.server.request.duration")
ACTIVE_REQUESTS: Final = "http.server.active_requests"

_NOTHING: Final[Any] = object()  # no value the app yielded is waiting to be passed on


class _Awaiting:
    """Awaits a generator that steps a coroutine by hand."""

    __slots__ = ("_steps",)

    def __init__(self, steps: Generator[Any, Any, None]) -> None:
        self._steps = steps

    def __await__(self) -> Generator[Any, Any, None]:
        return self._steps


class _Stop:
    """Yielded by a split's watchers at the response's end: its ``_run`` takes it, the event loop never sees it."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        yield self


class _Split:
    """One HTTP request through contrib's middleware: its app run up to the response's end, then the rest."""

    def __init__(self, middleware: object) -> None:
        self.middleware = middleware
        task = _current_task()
        # Weakly: copies of the request's context (anyio 3's idle worker thread keeps its last job's) hold the
        # split, and the task's context whatever the request left in it (sentry-sdk 2.0: its last exception).
        self._task = None if task is None else weakref.ref(task)
        self.called = False  # contrib has called its app, through the stand-in
        self.paused = False  # contrib's call has returned at the response's end; the rest of the app waits
        self._complete = False
        self._response_started = False
        self._expecting_trailers = False
        self._stop = _Stop()  # this split's own: a nested split's passes through it to the outer one
        self._stepping = False  # _run is inside one step of the app up to the response's end, in this task
        self._steps: Any = None  # the app's coroutine, stepped by _run
        # Where the app stands when paused: a value it yielded, not yet passed on to the event loop, or
        # what the event loop sent (or threw, the flag) to it, not yet delivered.
        self._resume: tuple[Any, bool, Any] = (_NOTHING, False, None)
        self._context: otel_context.Context | None = None

    @property
    def task(self) -> object | None:
        """The asyncio task that called contrib's middleware, while it exists (None under trio)."""
        return None if self._task is None else self._task()

    def call(self, app: App, scope: Message, receive: Receive, send: Send) -> Awaitable[None]:
        """Contrib's ``self.app(scope, receive, send)``: the app, watched, returning when the response is complete."""
        self.called = True
        self._steps = app(scope, self._watch_receive(receive), self._watch_send(send)).__await__()
        return _Awaiting(self._run(until_complete=True))

    async def finish(self) -> None:
        """Run the rest of the app, in the OpenTelemetry context it had when contrib's call returned."""
        token = otel_context.attach(self._context if self._context is not None else otel_context.get_current())
        try:
            await _Awaiting(self._run(until_complete=False))
        finally:
            otel_context.detach(token)

    def _run(self, until_complete: bool) -> Generator[Any, Any, None]:
        """Step the app as ``await`` would (PEP 380), stopping as soon as the response is complete.

        The watchers yield :class:`_Stop` from the very step that completed the response, so the app goes
        no further (no background task has begun, even one whose first await does not suspend). Where they
        could not (the response completed in another task), it stops after the step that did. Stopping
        between two steps, the app is not interrupted: contrib's ``finally`` runs (synchronous code), then
        :meth:`finish` takes the app on from exactly there, in the same task.
        """
        pending, throw, value = self._resume
        while True:
            if pending is _NOTHING:
                self._stepping = until_complete
                try:
                    pending = self._steps.throw(value) if throw else self._steps.send(value)
                except StopIteration:
                    return
                finally:
                    self._stepping = False
                if pending is self._stop:  # ours, from the step that completed the response
                    if until_complete:
                        self._pause(_NOTHING, False, None)
                        return
                    pending, throw, value = _NOTHING, False, None  # never the event loop's: resume the app
                    continue
                if until_complete and self._complete:
                    self._pause(pending, False, None)
                    return
            try:
                value, throw = (yield pending), False
            except GeneratorExit:
                self._steps.close()
                raise
            except BaseException as exc:  # cancellation included: the app gets it, as it would have
                value, throw = exc, True
            pending = _NOTHING
            if until_complete and self._complete:
                self._pause(pending, throw, value)
                return

    def _pause(self, pending: Any, throw: bool, value: Any) -> None:
        self._stepping = False  # a watcher of this split that runs later, from finish(), must not stop again
        self._resume = (pending, throw, value)
        self._context = otel_context.get_current()
        self.paused = True

    def _watch_send(self, send: Send) -> Send:
        async def send_and_watch(message: Message) -> None:
            await send(message)
            try:
                self._sent(message)
            except Exception as exc:
                internal_error(exc)
            if self._complete:  # the rest of the test in _stop_if_complete: a coroutine only when it may stop
                await self._stop_if_complete()

        return send_and_watch

    def _watch_receive(self, receive: Receive) -> Receive:
        async def receive_and_watch() -> Message:
            message = await receive()
            try:
                # The client left during the response (Starlette then stops streaming and runs the tasks).
                if message.get("type") == "http.disconnect" and self._response_started:
                    self._complete = True
            except Exception as exc:
                internal_error(exc)
            if self._complete:
                await self._stop_if_complete()
            return message

        return receive_and_watch

    async def _stop_if_complete(self) -> None:
        """Stop the app here, once, if this completed the response inside the step :meth:`_run` is taking.

        Only then does the yield reach our ``_run`` (through any nested split's, which passes on what is
        not its own); in another task (a streaming task group's, even one an eager task factory runs inside
        our step) it would reach that task's event loop.
        """
        if self._complete and self._stepping and not self.paused and self.task is _current_task():
            await self._stop

    def _sent(self, message: Message) -> None:
        """The response is complete when contrib ends its span, or with a ``pathsend`` (the whole body at once)."""
        kind = message.get("type")
        if kind == "http.response.start":
            self._response_started = True
            self._expecting_trailers = bool(message.get("trailers", False))
        elif kind == "http.response.body":
            self._complete |= not self._expecting_trailers and not message.get("more_body", False)
        elif kind == "http.response.trailers":
            self._complete |= self._expecting_trailers and not message.get("more_trailers", False)
        elif kind == "http.response.pathsend":
            self._complete = True


_current: ContextVar[_Split | None] = ContextVar("otel_bgtasks_request_split", default=None)


def _current_task() -> object | None:
    """The asyncio task running now (None under trio, where every contrib release calls its app in place)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


async def _call_middleware(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``OpenTelemetryMiddleware.__call__``: contrib's call ends with the response; the rest of the app after it."""
    scope = args[0] if args else kwargs.get("scope")
    # Off once removed: a wrapper that another library wrapped in turn (sentry-sdk patches middleware
    # classes' __call__ with plain functions) cannot be unwrapped, so it passes through.
    if _patched is None or not isinstance(scope, Mapping) or scope.get("type") != "http":  # pyright: ignore[reportUnknownMemberType]
        return await wrapped(*args, **kwargs)
    split = _Split(instance)
    token = _current.set(split)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        _current.reset(token)
        if split.paused:
            await split.finish()


class _InnerApp:
    """Class attribute ``app`` of contrib's middleware: each instance's own app, but a stand-in for its split call."""

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        try:
            app = vars(instance)["app"]
        except KeyError:
            raise AttributeError("app") from None
        split = _current.get()
        if split is None or split.called or split.middleware is not instance or split.task is not _current_task():
            return app  # split only when contrib calls it in place: the rest must run in the same task
        return functools.partial(split.call, app)

    def __set__(self, instance: object, app: Any) -> None:
        vars(instance)["app"] = app

    def __delete__(self, instance: object) -> None:
        del vars(instance)["app"]


_lock = threading.Lock()
_patched: type | None = None  # contrib's middleware class, while patched


def install() -> None:
    """Make contrib's request metrics end with the response, unless its release does so already."""
    global _patched
    with _lock, capture_internal_exceptions():
        if _patched is not None:
            return
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # pyright: ignore[reportMissingTypeStubs]

        if "app" in vars(OpenTelemetryMiddleware):
            _logger.debug("OpenTelemetryMiddleware has a class attribute 'app': request metrics left as they are")
            return
        if ends_at_response(OpenTelemetryMiddleware):
            _logger.debug("OpenTelemetryMiddleware already ends request metrics at the response: left alone")
            return
        # The attribute first: on its own it changes nothing, and it never outlives a failed install.
        setattr(OpenTelemetryMiddleware, "app", _InnerApp())  # noqa: B010
        try:
            wrap_function_wrapper(OpenTelemetryMiddleware, "__call__", _call_middleware)
        except BaseException:
            delattr(OpenTelemetryMiddleware, "app")
            raise
        _patched = OpenTelemetryMiddleware


def remove() -> None:
    """Undo :func:`install`. Requests already split finish the way they started."""
    global _patched
    with _lock, capture_internal_exceptions():
        middleware, _patched = _patched, None
        if middleware is None:
            return
        unwrap(middleware, "__call__")
        if isinstance(vars(middleware).get("app"), _InnerApp):
            delattr(middleware, "app")


# -- Does contrib's release need this at all? --------------------------------------------------------


class _Remembered:
    """A histogram or counter that only remembers what it was given."""

    def __init__(self, name: str, into: list[tuple[str, float]]) -> None:
        self._name = name
        self._into = into

    def record(self, amount: float, *args: Any, **kwargs: Any) -> None:
        self._into.append((self._name, amount))

    add = record


class _RememberingMeter:
    """Enough of a ``Meter`` for contrib's middleware: every ``create_*`` gives a :class:`_Remembered`."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, float]] = []

    def __getattr__(self, attribute: str) -> Callable[..., _Remembered]:
        if not attribute.startswith("create_"):
            raise AttributeError(attribute)

        def create(name: str, *args: Any, **kwargs: Any) -> _Remembered:
            return _Remembered(name, self.recorded)

        return create


_PROBE_SCOPE: Final[Mapping[str, Any]] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 80),
}


def _request_metric(record: tuple[str, float]) -> bool:
    name, amount = record
    return name in DURATIONS or (name == ACTIVE_REQUESTS and amount < 0)


def ends_at_response(middleware: Callable[..., Any]) -> bool:
    """Whether ``middleware`` (contrib's class, unpatched) already ends request metrics at the response.

    That is: it has recorded its request durations and taken the request off the active count by the time
    the response is complete; then there is nothing to fix. It serves one request to an app that notes
    what had been recorded when its response was complete, with a meter that only remembers and a no-op
    tracer: no SDK, no event loop, no global provider. An inconclusive answer is False: the fix is
    harmless where it was not needed.
    """
    meter = _RememberingMeter()
    at_response: list[tuple[str, float]] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        at_response.extend(meter.recorded)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    instance = middleware(app, tracer_provider=trace.NoOpTracerProvider(), meter=meter)
    serving = instance(dict(_PROBE_SCOPE), receive, send)
    try:
        serving.send(None)  # nothing in it waits: it runs to the end in one step
    except StopIteration:
        pass
    else:
        serving.close()
        return False
    recorded = [record for record in meter.recorded if _request_metric(record)]
    return bool(recorded) and recorded == [record for record in at_response if _request_metric(record)]
