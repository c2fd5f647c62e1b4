"""How a task's function is named in spans.

Starlette accepts any callable: plain and async functions, bound methods, ``functools.partial``,
decorated functions, classes and objects with ``__call__``. Each gets the name a person would look for
in their own code: the innermost function a decorator wraps (``inspect.unwrap``; through a wrapper written
without ``functools.wraps``, the one callable it closes over), the class a callable
object or a class used as a task belongs to, ``builtins.print`` for a builtin. Names are computed once
per callable (see :mod:`otel_bgtasks.identity`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import CodeType, FrameType, FunctionType, MethodType, ModuleType
from typing import Any, Final, cast

from opentelemetry.util.types import AttributeValue

from otel_bgtasks import semconv
from otel_bgtasks.config import NOT_SET, declared_timeout
from otel_bgtasks.identity import PerCallable


@dataclass(frozen=True)
class FunctionNames:
    """Span name, ``code.*`` attributes and per-function options of one task function, computed once."""

    span_name: str
    qualname: str
    function_name: str
    attributes: dict[str, AttributeValue]
    timeout: float | None = None  # from @task_options, if timeout_declared; else instrument()'s applies
    timeout_declared: bool = False
    # What every task of this function repeats, made once: its span's attributes known before it runs, per
    # background_task.execution, and its metric attributes per (execution, outcome, error.type) as they come.
    start_attributes: dict[str, dict[str, AttributeValue]] = field(
        default_factory=lambda: {}, compare=False, repr=False
    )
    metric_attributes: dict[tuple[str, str | None, str | None], dict[str, AttributeValue]] = field(
        default_factory=lambda: {}, compare=False, repr=False
    )


def describe(func: Any) -> FunctionNames:
    """Return the names for ``func``, the callable given to ``add_task``/``BackgroundTask``."""
    return _names.get(func if type(func) is FunctionType else _target(func))


def _target(func: object) -> object:
    """What ``func`` runs, as far as names go: a partial's function, a bound method's function."""
    while isinstance(func, functools.partial):
        func = func.func  # pyright: ignore[reportUnknownMemberType]
    return func.__func__ if isinstance(func, MethodType) else func


def _describe(target: object) -> FunctionNames:
    try:
        return _compute(target)
    except Exception:  # a hostile callable (a __getattr__ that raises): fall back to what its class says
        cls = type(target)
        return _names_from(cls.__qualname__, cls.__module__, None, NOT_SET)


_names: PerCallable[FunctionNames] = PerCallable(_describe)


def _compute(target: object) -> FunctionNames:
    if _is_mock(target):  # answers every attribute (__wrapped__, __code__...) with another Mock: name its class
        cls = _declared_class(type(target))
        return _names_from(cls.__qualname__, cls.__module__, None, NOT_SET)
    inner = _innermost(target)
    outer = target  # where @task_options may sit, above a decorator written without functools.wraps
    for _ in range(_MAX_FORWARDS):  # such a decorator's wrapper is named after what it runs
        forwarded = _forwarded_to(inner)
        if forwarded is None:
            break
        target, inner = forwarded, _innermost(forwarded)
    if inspect.iscoroutine(inner) or inspect.isgenerator(inner) or inspect.isasyncgen(inner):
        # add_task(send_email(addr)): named after the function that made it, as FastAPI and contrib do.
        kind = {"coroutine": "cr", "generator": "gi", "async_generator": "ag"}[type(inner).__name__]
        frame = getattr(inner, f"{kind}_frame", None)  # None once it has finished
        module = frame.f_globals.get("__name__") if isinstance(frame, FrameType) else None
        code = _code(getattr(inner, f"{kind}_code", None))
        return _names_from(_string(getattr(inner, "__qualname__", None)), _string(module), code, NOT_SET)
    if isinstance(inner, type):  # a class used as a task: what runs is its __init__
        return _names_from(
            inner.__qualname__, inner.__module__, _code_of(inner.__init__), declared_timeout(outer, target)
        )
    qualname = _string(getattr(inner, "__qualname__", None)) or _string(getattr(inner, "__name__", None))
    if qualname is not None:  # a function, a builtin, a method descriptor, a Cython function...
        code = _code(getattr(inner, "__code__", None))
        return _names_from(qualname, _module_of(inner), code, declared_timeout(outer, target))
    # A callable object: name its class.
    cls = type(inner)
    call = getattr(cls, "__call__", None)  # noqa: B004  # the class's, not the instance's
    return _names_from(cls.__qualname__, cls.__module__, _code_of(call), declared_timeout(outer, target, call))


def _names_from(qualname: str | None, module: str | None, code: CodeType | None, timeout: object) -> FunctionNames:
    qualname = qualname or (code.co_name if code is not None else "<unknown>")
    module = module or (inspect.getmodulename(code.co_filename) if code is not None else None)
    function_name = f"{module}.{qualname}" if module else qualname
    attributes: dict[str, AttributeValue] = {semconv.CODE_FUNCTION_NAME: function_name}
    if code is not None:
        attributes[semconv.CODE_FILE_PATH] = code.co_filename
        attributes[semconv.CODE_LINE_NUMBER] = code.co_firstlineno
    executions = (semconv.EXECUTION_ASYNC, semconv.EXECUTION_THREADPOOL)
    return FunctionNames(
        f"{semconv.SPAN_NAME_PREFIX} {qualname}",
        qualname,
        function_name,
        attributes,
        None if timeout is NOT_SET else timeout,  # pyright: ignore[reportArgumentType]  # declared_timeout(): float | None
        timeout is not NOT_SET,
        {execution: {**attributes, semconv.EXECUTION: execution} for execution in executions},
    )


def _string(value: object) -> str | None:
    # Exact types only: a Mock(spec=...) passes isinstance(), and a Mock attribute value is "Invalid type" to OTel.
    return value if type(value) is str and value else None


def _code(value: object) -> CodeType | None:
    return value if type(value) is CodeType else None


def _innermost(func: object) -> object:
    """The function every decorator (``functools.wraps``, ``lru_cache``...) around ``func`` wraps."""
    try:
        return inspect.unwrap(func)  # pyright: ignore[reportArgumentType]
    except ValueError:  # a __wrapped__ cycle
        return func


# The code flags of a wrapper that takes (*args, **kwargs) and nothing else.
_FORWARDING: Final = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS
_FUNCTIONS: Final[tuple[type[object], ...]] = (FunctionType, MethodType, functools.partial)
_MAX_FORWARDS: Final = 8  # decorators stacked; also ends a cycle of wrappers closing over each other


def _forwarded_to(func: object) -> object | None:
    """The callable a decorator's wrapper written without ``functools.wraps`` forwards to, if it is one.

    ``def wrapper(*args, **kwargs): return func(*args, **kwargs)``: a Python function that takes nothing
    but ``*args`` and ``**kwargs`` and closes over exactly one function (plain, bound or partial). Every
    function that decorator wraps runs ``wrapper``, so its name would be the same for all; the one it closes
    over is the user's. A callable object it closes over (a session factory) is something it uses, not it.
    """
    if type(func) is not FunctionType:
        return None
    code = func.__code__
    if code.co_flags & _FORWARDING != _FORWARDING or code.co_argcount or code.co_kwonlyargcount:
        return None
    found: list[object] = []
    for cell in func.__closure__ or ():
        try:
            value: object = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        if isinstance(value, _FUNCTIONS):  # not an object it calls (a session factory)
            found.append(cast(object, value))
    return _target(found[0]) if len(found) == 1 and found[0] is not func else None


def _code_of(func: object) -> CodeType | None:
    """The code of the innermost function ``func`` wraps, if it is Python code."""
    return _code(getattr(_innermost(func), "__code__", None))


def _module_of(func: object) -> str | None:
    module = _string(getattr(func, "__module__", None))
    if module is not None:
        return module
    owner = getattr(func, "__self__", None)  # [].append: the list; print: the builtins module
    if owner is None:
        owner = getattr(func, "__objclass__", None)  # str.upper: str
    if isinstance(owner, ModuleType):
        return owner.__name__
    if owner is not None:
        return (owner if isinstance(owner, type) else type(owner)).__module__
    return None


def _is_mock(obj: object) -> bool:
    mock = sys.modules.get("unittest.mock")  # only a program that made a mock has imported it
    return mock is not None and isinstance(obj, mock.NonCallableMock)


def _declared_class(cls: type[object]) -> type[object]:
    """The class as written: unittest.mock makes a same-named subclass per mock, named after the mock module."""
    while cls.__module__ == "unittest.mock" and len(cls.__bases__) == 1 and cls.__bases__[0].__name__ == cls.__name__:
        cls = cls.__bases__[0]
    return cls


MAX_LISTED: Final = 20


def listing(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``names`` for a log line: the first ``limit``, then how many more (20,000 skipped tasks made a 520 KB line)."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def error_type(exc: BaseException) -> str:
    """``error.type``: the qualified class name, bare for builtins as the semantic conventions ask."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def safe_str(error: BaseException) -> str:
    """``str(error)``, or a placeholder when the exception's own ``__str__`` raises."""
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__qualname__}: str() failed>"
