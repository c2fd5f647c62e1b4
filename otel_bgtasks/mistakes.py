"""The common background-task mistakes, each made obvious where it happens.

- ``add_task(send_email(address))``: a coroutine object or a return value instead of the function.
  Starlette accepts it and fails only later, after the response, with "'coroutine' object is not
  callable" and a "never awaited" warning that names neither the route nor the fix.
- An ``async def`` that Starlette takes for a sync function (under a plain sync decorator, a raw
  ``staticmethod`` object) or an async generator function: Starlette runs it in the thread pool, gets a
  coroutine (or an async generator) back and drops it: the body never runs, and nothing fails.
- A ``BackgroundTasks`` filled and then never attached to a response (or a response that never
  finished): its tasks are garbage-collected without running, silently.
"""

from __future__ import annotations

import inspect
import logging
from types import CodeType, FrameType
from typing import Any, Final

_logger = logging.getLogger("otel_bgtasks")

# Frames of these packages are skipped when looking for the line that created a task; the demo app
# in otel_bgtasks.cli is the user's code there.
_FRAMEWORK_MODULES: Final = ("starlette.", "fastapi.", "otel_bgtasks.", "wrapt.")
_USER_MODULES: Final = ("otel_bgtasks.cli.",)


def invalid_task_problem(func: object) -> str | None:
    """Why ``func`` cannot be a background task, with the fix; ``None`` when it is fine."""
    if inspect.iscoroutine(func):
        name = func.__qualname__
        return (
            f"add_task()/BackgroundTask() was given a coroutine object, {name}(...) called instead of passed. "
            f"Pass the function and its arguments: add_task({name}, *args, **kwargs)."
        )
    if not callable(func):
        return (
            f"add_task()/BackgroundTask() was given a {type(func).__qualname__}, which is not callable "
            "(a function's return value instead of the function?). "
            "Pass the function and its arguments: add_task(func, *args, **kwargs)."
        )
    return None


class DiscardedCoroutineError(Exception):
    """What a task's record says when its function returned a coroutine or an async generator that Starlette dropped.

    Never raised: the app sees what it saw uninstrumented (nothing, and Python's own "never awaited"
    warning for a coroutine). It is the span's ``error.type``, the metrics' and the ERROR record's.
    """


def discarded_awaitable(returned: object) -> str | None:
    """What a sync task's return value is, if it is the body of an async function that will never run."""
    if inspect.iscoroutine(returned):
        return "a coroutine"
    if inspect.isasyncgen(returned):
        return "an async generator"
    return None


def discarded_problem(func: object, returned: str) -> str:
    """Why the task's body never ran, and the fix (the diagnosis hint of cause 1)."""
    if isinstance(func, staticmethod | classmethod):
        kind = "staticmethod" if isinstance(func, staticmethod) else "classmethod"
        return (
            f"The task is a raw {kind} object wrapping an async def: Starlette took it for a sync function, ran it "
            f"in the thread pool and dropped the coroutine it returned, so its body never ran. Pass the function "
            f"itself (Class.method, not vars(Class)['method'] or the {kind} object)."
        )
    if returned == "an async generator":
        return (
            "The task is an async generator function: calling it only makes an async generator, which Starlette "
            "dropped, so its body never ran. Make it a plain async def (no yield)."
        )
    return (
        f"The task returned {returned}: an async def under a plain sync decorator, which Starlette took for a sync "
        "function, ran in the thread pool and whose coroutine it dropped, so its body never ran. Make the "
        "decorator's wrapper async too (async def wrapper(*args, **kwargs): return await func(*args, **kwargs)), "
        "with functools.wraps."
    )


def creation_site(frame: FrameType) -> tuple[str, int]:
    """(file, line) of the user's code that is creating a task: ``frame`` or the first caller outside the frameworks.

    ``frame`` is the caller of otel_bgtasks' ``__init__`` wrapper, taken with ``sys._getframe(1)``: walking
    from there, rather than from this function's own frame, makes one frame object fewer per task.
    """
    while True:
        code = frame.f_code
        known = _framework_code.get(code)  # inlined: a call per frame costs more than the lookup
        if known is None:
            known = _is_framework(code, frame.f_globals)
        if not known:
            return code.co_filename, frame.f_lineno
        back = frame.f_back  # asked for only when needed: each frame object made is an allocation
        if back is None:
            return code.co_filename, frame.f_lineno
        frame = back


# Per code object, whether it is the frameworks': every task walks the same few frames, so the module
# name checks run once per function, not once per task. Bounded: code made at run time is rare here.
_framework_code: dict[CodeType, bool] = {}


def _is_framework(code: CodeType, module_globals: dict[str, Any]) -> bool:
    known = _framework_code.get(code)
    if known is None:
        module = str(module_globals.get("__name__", ""))
        known = module.startswith(_FRAMEWORK_MODULES) and not module.startswith(_USER_MODULES)
        if len(_framework_code) < 4096:
            _framework_code[code] = known
    return known


# The messages, %-formatted with the task's code.function.name and a place or a time: in the log, and in
# the pytest plugin's failures (testing.py).
DROPPED: Final = (
    "Background task %s was never run: it was created at %s and garbage-collected before running. "
    "Its BackgroundTasks/BackgroundTask was not attached to a response that completed "
    "(return it as the response's background=, or use FastAPI's BackgroundTasks parameter)."
)
BLOCKING: Final = (
    "Background task %s blocked the event loop for %.3f s without awaiting, stalling every request "
    "meanwhile. Make it a plain `def` (Starlette runs those in a thread pool) or use an async library "
    "for the blocking call."
)


def report_dropped(function_name: str, site: str | None) -> None:
    """Log a task that was garbage-collected without ever running."""
    _logger.warning(DROPPED, function_name, site or "an unknown place")
