"""Recognise why a background task failed, when the reason is a known mistake, and say how to fix it.

Two of the common reasons background tasks fail only show as a plain exception whose text names
neither the mistake nor the fix:

- An event-loop conflict: ``asyncio.run()`` inside an ``async def`` task (which already runs on the
  server's loop), an asyncio object or client created on another loop, ``asyncio.get_event_loop()``
  in a ``def`` task's worker thread.
- A database session used outside its lifecycle: the task runs after the response, when the
  request's session, connection or ORM objects are closed or detached.

:func:`diagnose` maps such an exception (or one in its ``__cause__``/``__context__`` chain, or in an
exception group) to a :class:`Diagnosis`. :func:`handed_over_session` spots the second mistake when the
task starts, before it fails, since it often works by luck of timing. SQLAlchemy is recognised by
class and module names and never imported here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from otel_bgtasks import semconv

_logger = logging.getLogger("otel_bgtasks")


@dataclass(frozen=True)
class Diagnosis:
    """Why a task failed: ``value`` for machines (a span attribute, a Sentry tag), ``hint`` for people."""

    value: str
    hint: str


_NESTED_LOOP: Final = Diagnosis(
    semconv.DIAGNOSIS_EVENT_LOOP_CONFLICT,
    "An async def task already runs on the server's event loop: await the coroutine instead of calling "
    "asyncio.run() or run_until_complete() (from a def task, use anyio.from_thread.run).",
)
_OTHER_LOOP: Final = Diagnosis(
    semconv.DIAGNOSIS_EVENT_LOOP_CONFLICT,
    "An asyncio object or client (Lock, Event, Queue, httpx/asyncpg client...) was created on another event "
    "loop, one that may be closed: create it in the app's lifespan or inside the task.",
)
_NO_LOOP_IN_THREAD: Final = Diagnosis(
    semconv.DIAGNOSIS_EVENT_LOOP_CONFLICT,
    "A def task runs in a worker thread with no event loop: make it async def and await, or call async code "
    "from it with anyio.from_thread.run.",
)
_NOT_A_WORKER_THREAD: Final = Diagnosis(
    semconv.DIAGNOSIS_EVENT_LOOP_CONFLICT,
    "anyio.from_thread.run works only in the worker thread Starlette runs a def task in: in an async def "
    "task, await the coroutine directly.",
)
_SESSION_CLOSED: Final = Diagnosis(
    semconv.DIAGNOSIS_SESSION_OUTSIDE_REQUEST,
    "The task used the request's database session, connection or ORM objects after the request closed them: "
    "open a new session inside the task, and pass ids rather than ORM objects.",
)
_LAZY_LOAD_OUTSIDE_SESSION: Final = Diagnosis(
    semconv.DIAGNOSIS_SESSION_OUTSIDE_REQUEST,
    "An ORM object loaded by the request's AsyncSession was lazy-loaded in the task: open a new AsyncSession "
    "inside the task, load what it needs there, and pass ids rather than ORM objects.",
)

# Exception classes, by module and qualified name, so that nothing is imported to recognise them.
_BY_CLASS: Final[Mapping[str, Diagnosis]] = {
    "sqlalchemy.orm.exc.DetachedInstanceError": _SESSION_CLOSED,
    "sqlalchemy.exc.ResourceClosedError": _SESSION_CLOSED,  # "This Connection is closed", "This result object..."
    "sqlalchemy.exc.MissingGreenlet": _LAZY_LOAD_OUTSIDE_SESSION,
}

# Message fragments, as the libraries spell them (CPython 3.10 to 3.13, anyio 3 and 4, SQLAlchemy 2).
_BY_MESSAGE: Final[tuple[tuple[str, Diagnosis], ...]] = (
    ("asyncio.run() cannot be called from a running event loop", _NESTED_LOOP),
    ("This event loop is already running", _NESTED_LOOP),
    ("Cannot run the event loop while another loop is running", _NESTED_LOOP),
    ("is bound to a different event loop", _OTHER_LOOP),  # asyncio Lock, Event, Queue, Semaphore, Condition
    ("attached to a different loop", _OTHER_LOOP),  # "Task ... got Future ... attached to a different loop"
    ("Event loop is closed", _OTHER_LOOP),  # a client whose connections belong to a loop that has ended
    ("There is no current event loop in thread", _NO_LOOP_IN_THREAD),  # asyncio.get_event_loop()
    ("no running event loop", _NO_LOOP_IN_THREAD),  # asyncio.create_task(), get_running_loop()
    ("Not running inside an AnyIO worker thread", _NOT_A_WORKER_THREAD),  # anyio 4
    ("can only be run from an AnyIO worker thread", _NOT_A_WORKER_THREAD),  # anyio 3
    ("This Session has been permanently closed", _SESSION_CLOSED),
    ("is not bound to a Session", _SESSION_CLOSED),
    ("is not persistent within this Session", _SESSION_CLOSED),  # refresh() of the request's object
    ("is already attached to session", _SESSION_CLOSED),  # add() of the request's object to a new session
    ("this identity map is no longer valid", _SESSION_CLOSED),  # a query result read after its session closed
    ("This Connection is closed", _SESSION_CLOSED),
    ("Cannot operate on a closed database", _SESSION_CLOSED),  # sqlite3, also wrapped by SQLAlchemy
    ("no active connection", _SESSION_CLOSED),  # aiosqlite
)

_MAX_EXCEPTIONS: Final = 32  # exceptions looked at per failure: chains and groups can be long, or cyclic
_MAX_MESSAGE: Final = 2000  # characters searched per message: SQLAlchemy appends the SQL statement


def misuse(problem: str) -> Diagnosis:
    """Cause 1: the task was created with something that cannot run; ``problem`` says what, and the fix."""
    return Diagnosis(semconv.DIAGNOSIS_ADD_TASK_MISUSE, problem)


def diagnose(error: BaseException) -> Diagnosis | None:
    """The known mistake behind ``error``, or ``None``; never raises."""
    try:
        for exc in _chain(error):
            found = _match(exc)
            if found is not None:
                return found
    except Exception:
        pass  # an exception too odd to read is simply not diagnosed
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the members of exception groups, each once."""
    pending = [error]
    seen: set[int] = set()
    while pending and len(seen) < _MAX_EXCEPTIONS:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        members: object = getattr(exc, "exceptions", None)  # exception groups: a tuple, a list in anyio 3's
        if isinstance(members, tuple | list):
            group = cast("Sequence[object]", members)
            pending.extend(member for member in reversed(group) if isinstance(member, BaseException))
        context = None if exc.__suppress_context__ else exc.__context__
        for linked in (context, exc.__cause__):  # popped cause first, as the traceback reads it
            if linked is not None:
                pending.append(linked)


def _match(exc: BaseException) -> Diagnosis | None:
    for cls in type(exc).__mro__:
        found = _BY_CLASS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    try:
        message = str(exc)[:_MAX_MESSAGE]
    except Exception:
        return None  # a __str__ that raises
    for fragment, found in _BY_MESSAGE:
        if fragment in message:
            return found
    return None


# -- At the start of a task: the request's session handed over -------------------------------------

# Types whose instances belong to one request's database work.
_SESSION_TYPES: Final[Mapping[str, str]] = {
    "sqlalchemy.orm.session.Session": "a SQLAlchemy Session",
    "sqlalchemy.ext.asyncio.session.AsyncSession": "a SQLAlchemy AsyncSession",
    "sqlalchemy.orm.scoping.scoped_session": "a SQLAlchemy scoped_session",
    "sqlalchemy.ext.asyncio.scoping.async_scoped_session": "a SQLAlchemy async_scoped_session",
    "sqlalchemy.engine.base.Connection": "a SQLAlchemy Connection",
    "sqlalchemy.ext.asyncio.engine.AsyncConnection": "a SQLAlchemy AsyncConnection",
}
_MAPPED: Final = "mapped"  # instances of the class are ORM objects: look at each one's state
_PLAIN: Final = ""

# What each argument type is, found once per type: most task arguments are ints, strings and models.
# A plain dict, bounded: a WeakKeyDictionary lookup costs four times as much (measured), on every task.
_kinds: dict[type, str] = {}
_MAX_KINDS: Final = 4096

_warned: set[str] = set()
_MAX_WARNED: Final = 4096


def handed_over_session(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    """Which argument is a SQLAlchemy session, connection or ORM object from one, described; else ``None``.

    Only the arguments themselves are looked at, not what they contain. Costs one dictionary lookup
    when SQLAlchemy was never imported.
    """
    if "sqlalchemy" not in sys.modules:
        return None
    try:
        for index, value in enumerate(args):
            what = _session_like(value)
            if what is not None:
                return f"args[{index}] is {what}"
        for name, value in kwargs.items():
            what = _session_like(value)
            if what is not None:
                return f"kwargs[{name!r}] is {what}"
    except Exception:
        pass  # an argument too odd to inspect is not a session we know
    return None


def _session_like(value: object) -> str | None:
    cls = type(value)
    kind = _kinds.get(cls)
    if kind is None:
        kind = _kind_of(cls)
        if len(_kinds) < _MAX_KINDS:
            _kinds[cls] = kind
    if kind == _PLAIN:
        return None
    if kind != _MAPPED:
        return f"{kind} ({cls.__module__}.{cls.__qualname__})"
    state: Any = sys.modules["sqlalchemy"].inspect(value, raiseerr=False)
    if state is None:
        return None
    if state.session is not None:
        return f"an ORM object ({cls.__module__}.{cls.__qualname__}) attached to a Session"
    if state.detached:
        return f"an ORM object ({cls.__module__}.{cls.__qualname__}) detached from its closed Session"
    return None  # transient: never loaded nor added, plain data


def _kind_of(cls: type) -> str:
    for base in cls.__mro__:
        kind = _SESSION_TYPES.get(f"{base.__module__}.{base.__qualname__}")
        if kind is not None:
            return kind
    sqlalchemy: Any = sys.modules["sqlalchemy"]
    mapper = sqlalchemy.inspect(cls, raiseerr=False)  # a Mapper for mapped classes, else None
    return _MAPPED if type(mapper).__name__ == "Mapper" else _PLAIN


def warn_handed_over_session(function_name: str, description: str) -> None:
    """One WARNING per task function that receives the request's session (the span event shows every run)."""
    if function_name in _warned or len(_warned) >= _MAX_WARNED:
        return
    _warned.add(function_name)
    _logger.warning(
        "Background task %s received the request's database session or ORM objects (%s). It runs after the "
        "response, when the request may have closed that session: it works only by luck of timing. %s",
        function_name,
        description,
        "Open a new session inside the task, and pass ids rather than ORM objects.",
    )
