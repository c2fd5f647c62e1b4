"""Request metrics that end with the response, not with the background tasks run after it.

Contrib's ASGI ``OpenTelemetryMiddleware`` (the request instrumentation ``instrument(app)`` adds, and
the one opentelemetry-instrumentation-fastapi and -starlette use) records ``http.server.duration`` /
``http.server.request.duration`` and takes the request off ``http.server.active_requests`` in a
``finally`` after ``await self.app(...)`` returns; Starlette runs background tasks inside that call,
after the response, so the request is measured until its last task ends
(opentelemetry-python-contrib#3591; its span already ends with the last body chunk).

Why this design: nothing about the app's call changes. The middleware's ``__call__``, the coroutine it
returns and everything a server inspects (uvicorn calls the app with no arguments to detect a factory
and expects ``TypeError``; hypercorn asks ``inspect.iscoroutinefunction``) stay contrib's own. An
earlier design split contrib's call at the response's end by stepping the app's coroutine by hand: it
broke ``uvicorn module:app`` for ``OpenTelemetryMiddleware(app)`` served directly, added a class
attribute to contrib's class, and cost about 64 k instructions on every request, tasks or not.
Instead, what contrib *records* is adjusted, through its own instruments:

- ``OpenTelemetryMiddleware.__init__`` is wrapped (wrapt, a sync wrapper) to put thin proxies on the
  new instance's request-duration histograms and active-requests counter; the attribute names cover
  every contrib release from 0.46b0 (``duration_histogram``, then ``duration_histogram_old`` /
  ``duration_histogram_new``; ``active_requests_counter`` throughout).
- Contrib's ``add(+1)`` at a request's start hands a small holder (a list, see ``_Request``) to the
  request's context, a ``ContextVar``. It is set before contrib calls the app, so every copy of that
  context (a task group's, ``BaseHTTPMiddleware``'s) shares the same holder by reference. Contrib's
  ``add(-1)`` marks it finished rather than resetting the variable (a reset costs as much again; a server
  runs each request in a context of its own, and an in-process client's context keeps only the last,
  inert holder).
- The response is complete when the first background task of the request starts from a Starlette
  response (its ``background``, found among the task's awaiters): Starlette runs them right after the
  last body chunk (or once the client is gone from a stream). A task the route awaits itself, before
  answering, is no sign of it. The task wrappers call :func:`response_complete` then, which takes the
  request off the active count with contrib's own counter and attributes, and notes the time. Contrib's
  own ``add(-1)`` later is then not passed on.
- Contrib's duration records, after the tasks, are passed on minus the time spent after that moment
  (the seconds histogram: its value less that time; the whole-millisecond one, which contrib rounds:
  the time from contrib's ``add(+1)`` to that moment, rounded as contrib does, rather than a rounded
  value less a time).

The same wrapper of ``__init__`` (installed with or without ``request_metrics_end_at_response``) tells the
instrumentor the ``tracer_provider`` each new instance was given: task spans follow it, as the instance
keeps only a tracer made from it.

A request that queues no task pays the proxies' pass-through and its holder's ``ContextVar.set``, most of the
cost: the variable makes each of the request's other context operations work on one key more
(benchmarks/results.md: per request).
Records made before the first task starts pass through untouched, so a contrib release that already
ends these metrics at the response is measured as it measures itself: nothing to detect. Nested
contrib middlewares (FastAPI's instrumentation and a user's own) each get a holder, chained, and all
end together. A request whose app raises before responding, or that queues no task, records exactly
what contrib records. Middleware instances made before :func:`install` keep contrib's behaviour
unless :func:`equip` reaches them (``instrument(app)`` does, for the app it is given).
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from timeit import default_timer
from types import CodeType, FrameType
from typing import Any, Final, SupportsIndex

from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from otel_bgtasks.guard import capture_internal_exceptions, internal_error

_logger = logging.getLogger("otel_bgtasks")

# Contrib's instruments on a middleware instance, by release: duration histograms and their units' scale
# to seconds (0.46b0: ``duration_histogram``, ms; 0.47b0 on: ``_old`` in ms, ``_new`` in s, either None).
DURATION_ATTRIBUTES: Final = {"duration_histogram": 1000, "duration_histogram_old": 1000, "duration_histogram_new": 1}
ACTIVE_REQUESTS_ATTRIBUTE: Final = "active_requests_counter"


# One HTTP request through one contrib middleware, from contrib's add(1): a list, which costs about 1 k
# instructions a request less than an instance of a class with slots (measured under callgrind):
#   [_OWNER]       the middleware's counter stand-in: its duration histograms answer to the same
#   [_ATTRIBUTES]  contrib's own attributes, for its add(-1)
#   [_OUTER]       an outer contrib middleware's request, which ends at the same response; or None
#   [_STARTED]     default_timer() at contrib's add(1)
#   [_ENDED]       default_timer() when the response completed and the request was taken off the active
#                  count; None until then (contrib's own add(-1) is then not passed on)
#   [_FINISHED]    contrib's add(-1) came: the request is over, whatever is left of it in a context
_Request = list[Any]
_OWNER, _ATTRIBUTES, _OUTER, _STARTED, _ENDED, _FINISHED = range(6)

# Set at contrib's add(1), not reset at its add(-1): a reset costs as much again (measured), and a server
# runs each request in a context of its own. Where the app is called in its caller's context (an
# in-process client), what is left is the last request's holder, finished and inert; the next request
# replaces it without linking to it, so nothing accumulates.
_current: ContextVar[_Request | None] = ContextVar("otel_bgtasks_request_metrics", default=None)

# Requests taken off the active count at their response whose add(-1) has not come yet: while there are
# none, contrib's duration records pass on without looking for their request. A count, not a set of ids:
# the set's add and discard cost the request that ran a task about as much as the lookup saved. Only a
# hint: event loops in several threads could lose an update, and then one request's duration is recorded
# as contrib records it (too low), or records look for their request as they did before (too high).
_ended = 0


def response_complete() -> None:
    """A task starts: if a Starlette response runs it, the response of the request (and of any outer one) is complete.

    Called by the task wrappers at every task's start; past the first task of a request, one lookup. A task
    the route awaits itself (``await BackgroundTask(job)()`` before answering) runs before the response:
    it ends nothing, so the request stays active and its duration includes what follows.
    """
    global _ended
    request = _current.get()
    checked = False
    while request is not None:
        if request[_ENDED] is None and not request[_FINISHED]:
            if not checked:
                try:
                    if not _run_by_a_response(sys._getframe(2)):  # pyright: ignore[reportPrivateUsage]
                        return
                except Exception as exc:
                    internal_error(exc)
                    return
                checked = True
            ended = default_timer()
            try:
                request[_OWNER].__wrapped__.add(-1, request[_ATTRIBUTES])
                request[_ENDED] = ended
                _ended += 1
            except Exception as exc:
                internal_error(exc)
        request = request[_OUTER]


def _run_by_a_response(frame: FrameType | None) -> bool:
    """Whether a Starlette response's ``__call__`` awaits the task: it runs its ``background`` once it sent all.

    ``frame`` is the task wrapper's caller. A few frames up at most (Starlette's or FastAPI's
    ``BackgroundTasks``, a subclass's own ``__call__``); a response class of another module that runs its
    background leaves the metrics as contrib records them.
    """
    for _ in range(_AWAITERS_SEARCHED):
        if frame is None:
            return False
        if id(frame.f_code) in _response_call_ids:
            return True
        frame = frame.f_back
    return False


_AWAITERS_SEARCHED: Final = 12


def _response_calls() -> frozenset[CodeType]:
    """The code of each ``__call__`` that runs a Starlette response's background once it has sent the response.

    Starlette's responses, and the streaming response of ``BaseHTTPMiddleware``'s ``call_next`` (whose
    ``background`` a middleware may set).
    """
    from starlette import responses
    from starlette.middleware import base

    codes: set[CodeType] = set()
    for module in (responses, base):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, responses.Response):
                code = getattr(vars(value).get("__call__"), "__code__", None)
                if isinstance(code, CodeType):
                    codes.add(code)
    return frozenset(codes)


# Set by install(), which runs only with Starlette there (the package imports without it). The codes are
# kept so that their ids stay theirs; ids, because a code object's own hash walks its fields.
_response_codes: frozenset[CodeType] = frozenset()
_response_call_ids: frozenset[int] = frozenset()


class _Instrument:
    """A thin stand-in for one of contrib's instruments, with the API's own call signature.

    Measured under callgrind, each piece of generality costs on every request: a wrapt proxy's Python
    subclass or a ``__getattr__`` sends every attribute access down the slow path, and ``*args, **kwargs``
    forwarding costs about 3 k instructions a call. So: slots, the API's explicit parameters (checked
    against the installed API by :func:`_api_signatures_known`), and the instrument's descriptive
    attributes as properties. Copies and pickles are the instrument's own, as uninstrumented.
    """

    __slots__ = ("__wrapped__",)

    def __init__(self, instrument: Any) -> None:
        self.__wrapped__ = instrument

    @property
    def name(self) -> Any:
        """The instrument's."""
        return self.__wrapped__.name

    @property
    def unit(self) -> Any:
        """The instrument's."""
        return self.__wrapped__.unit

    @property
    def description(self) -> Any:
        """The instrument's."""
        return self.__wrapped__.description

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # pyright: ignore[reportIncompatibleMethodOverride]
        """The instrument's: ``isinstance`` and pickle see the instrument, as wrapt's proxies make them."""
        instrument: Any = self.__wrapped__
        return type(instrument)  # pyright: ignore[reportUnknownVariableType]

    def __repr__(self) -> str:
        return repr(self.__wrapped__)

    def __copy__(self) -> Any:
        return copy.copy(self.__wrapped__)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.__wrapped__, memo)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)


class _ActiveRequests(_Instrument):
    """Contrib's ``http.server.active_requests`` counter on one middleware: it hands out the request's holder."""

    __slots__ = ()

    def add(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        """Contrib's ``add(1, ...)`` at a request's start, ``add(-1, ...)`` at its end: the same ``attributes``."""
        global _ended
        if amount == -1:
            request = _current.get()
            while request is not None and request[_OWNER] is not self:  # its own first; past it, nested ones
                request = request[_OUTER]
            if request is not None and not request[_FINISHED]:
                request[_FINISHED] = True
                if request[_ENDED] is not None:
                    _ended -= 1
                    return  # taken off at the response's end already
        elif amount == 1 and _installed is not None:
            current = _current.get()
            outer = None if current is None or current[_FINISHED] else current
            _current.set([self, attributes, outer, default_timer(), None, False])
        if context is None:  # the API before 1.28 has no context parameter: pass it only when given
            self.__wrapped__.add(amount, attributes)
        else:
            self.__wrapped__.add(amount, attributes, context)


class _Duration(_Instrument):
    """One of contrib's request duration histograms on one middleware: it leaves out the time after the response."""

    __slots__ = ("owner", "scale")

    def __init__(self, histogram: Any, owner: _ActiveRequests, scale: int) -> None:
        super().__init__(histogram)
        self.owner = owner
        self.scale = scale  # the unit's per second: 1000 for ms

    def record(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        """Contrib's record in its ``finally``: after the tasks, its value less their time."""
        if _ended:
            request = _current.get()
            while request is not None and request[_OWNER] is not self.owner:
                request = request[_OUTER]
            if request is not None and request[_ENDED] is not None and not request[_FINISHED]:
                try:
                    amount = self._until_response(amount, request)
                except Exception as exc:
                    internal_error(exc)
        if context is None:
            self.__wrapped__.record(amount, attributes)
        else:
            self.__wrapped__.record(amount, attributes, context)

    def _until_response(self, amount: Any, request: _Request) -> Any:
        if self.scale == 1:
            return max(amount - (default_timer() - request[_ENDED]), 0)
        return max(round((request[_ENDED] - request[_STARTED]) * self.scale), 0)


def _api_signatures_known() -> bool:
    """Whether the API's ``add`` and ``record`` take what the stand-ins take, and no more (a later API might)."""
    from opentelemetry.metrics import Histogram, UpDownCounter

    known = (["self", "amount", "attributes"], ["self", "amount", "attributes", "context"])
    return all(list(inspect.signature(method).parameters) in known for method in (UpDownCounter.add, Histogram.record))


def _proxies(instance: Any) -> Iterator[tuple[str, Any]]:
    """The proxies ``instance`` needs: (attribute, proxy), none if it has them or lacks contrib's counter."""
    counter = getattr(instance, ACTIVE_REQUESTS_ATTRIBUTE, None)
    if counter is None or isinstance(counter, _ActiveRequests):
        return
    owner = _ActiveRequests(counter)
    yield ACTIVE_REQUESTS_ATTRIBUTE, owner
    for name, scale in DURATION_ATTRIBUTES.items():
        histogram = getattr(instance, name, None)
        if histogram is not None:
            yield name, _Duration(histogram, owner, scale)


def _equip_one(instance: Any) -> None:
    for name, proxy in list(_proxies(instance)):
        setattr(instance, name, proxy)


def _init_middleware(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``OpenTelemetryMiddleware.__init__``: contrib's, then task spans follow its provider, and the proxies."""
    wrapped(*args, **kwargs)
    with capture_internal_exceptions():
        follow = _follow
        if follow is not None:
            # The instance keeps only a tracer: its provider is seen here, as an argument, or never.
            provider = kwargs.get("tracer_provider")
            if provider is None and len(args) > 1:
                provider = inspect.signature(wrapped).bind(*args, **kwargs).arguments.get("tracer_provider")
            follow(provider, instance)
        if _installed:
            _equip_one(instance)


def equip(app: Any) -> None:
    """Give contrib middleware instances made before :func:`install` their proxies: ``app`` and those it wraps.

    Follows ``app``'s ``.app`` and Starlette's built ``middleware_stack``, a few levels deep.
    """
    with capture_internal_exceptions():
        if _installed is None:
            return
        from otel_bgtasks.request_spans import contrib_middlewares  # imports contrib's middleware: when needed

        for middleware in contrib_middlewares(app):
            _equip_one(middleware)


_lock = threading.Lock()
_wrapped: type | None = None  # contrib's middleware class, while its __init__ is wrapped
_installed: type | None = None  # the same, while request metrics end at the response
_follow: Callable[[Any, Any], None] | None = None  # the instrumentor's, given each new instance and its provider


def install(follow: Callable[[Any, Any], None], end_at_response: bool) -> None:
    """Watch contrib's middleware instances made from now on: task spans follow the provider each is given.

    Args:
        follow: called with the ``tracer_provider`` each new instance was given (``None`` if none) and the instance.
        end_at_response: also make their request metrics end with the response.
    """
    global _wrapped, _installed, _follow, _response_codes, _response_call_ids
    with _lock, capture_internal_exceptions():
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # pyright: ignore[reportMissingTypeStubs]

        _follow = follow
        if _wrapped is None:
            wrap_function_wrapper(OpenTelemetryMiddleware, "__init__", _init_middleware)
            _wrapped = OpenTelemetryMiddleware
        if not end_at_response or _installed is not None:
            return
        if not _api_signatures_known():
            _logger.debug("the metrics API's add/record take other parameters: request metrics left as they are")
            return
        _response_codes = _response_calls()
        _response_call_ids = frozenset(map(id, _response_codes))
        _installed = OpenTelemetryMiddleware


def remove() -> None:
    """Undo :func:`install`. Instances keep their proxies, which start no new request once removed."""
    global _wrapped, _installed, _follow
    with _lock, capture_internal_exceptions():
        middleware, _wrapped, _installed, _follow = _wrapped, None, None, None
        if middleware is None:
            return
        # Only our own wrapper: unwrap() would take off another library's wrapped over ours (ours then passes through).
        if getattr(vars(middleware).get("__init__"), "_self_wrapper", None) is _init_middleware:
            unwrap(middleware, "__init__")
