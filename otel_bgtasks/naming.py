"""How a task's function is named in spans.

Starlette accepts any callable: plain and async functions, bound methods, ``functools.partial`` and
objects with ``__call__``. Each gets the name a person would look for in their own code.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from types import CodeType
from typing import Any, Final

from opentelemetry.util.types import AttributeValue

from otel_bgtasks import semconv
from otel_bgtasks.task_options import TIMEOUT_ATTRIBUTE

_NOT_SET: Final = object()


@dataclass(frozen=True)
class FunctionNames:
    """Span name, ``code.*`` attributes and per-function options of one task function, computed once."""

    span_name: str
    qualname: str
    function_name: str
    attributes: dict[str, AttributeValue]
    timeout: float | object | None = _NOT_SET  # from @task_options; _NOT_SET: use instrument()'s

    def timeout_or(self, default: float | None) -> float | None:
        """This function's own timeout if it has one, else ``default``."""
        return default if self.timeout is _NOT_SET else self.timeout  # type: ignore[return-value]


# Keyed by code object (every lambda made by one line shares one) or by class, so the cache grows with
# the number of task functions in the program, not with the number of tasks.
_cache: dict[CodeType | type[object], FunctionNames] = {}
_MAX_CACHED: Final = 4096


def _unwrap(func: Any) -> Any:
    while isinstance(func, functools.partial):
        func = func.func  # pyright: ignore[reportUnknownMemberType]
    return getattr(func, "__func__", func)  # bound methods


def describe(func: Any) -> FunctionNames:
    """Return the names for ``func``, the callable given to ``add_task``/``BackgroundTask``."""
    target: object = _unwrap(func)
    code: CodeType | None = getattr(target, "__code__", None)
    key: CodeType | type[object] = code if code is not None else type(target)
    names = _cache.get(key)
    if names is None:
        names = _compute(target, code)
        if len(_cache) < _MAX_CACHED:
            _cache[key] = names
    return names


def _compute(target: object, code: CodeType | None) -> FunctionNames:
    if code is None:
        # A callable object: name its class, point at its __call__.
        owner: type[object] = type(target)
        qualname = owner.__qualname__
        module = owner.__module__
        code = getattr(owner.__call__, "__code__", None)
    else:
        qualname = getattr(target, "__qualname__", code.co_name)
        module = getattr(target, "__module__", None) or inspect.getmodulename(code.co_filename) or ""
    function_name = f"{module}.{qualname}" if module else qualname
    attributes: dict[str, AttributeValue] = {semconv.CODE_FUNCTION_NAME: function_name}
    if code is not None:
        attributes[semconv.CODE_FILE_PATH] = code.co_filename
        attributes[semconv.CODE_LINE_NUMBER] = code.co_firstlineno
    timeout = getattr(target, TIMEOUT_ATTRIBUTE, _NOT_SET)
    return FunctionNames(f"{semconv.SPAN_NAME_PREFIX} {qualname}", qualname, function_name, attributes, timeout)


def error_type(exc: BaseException) -> str:
    """``error.type``: the qualified class name, bare for builtins as the semantic conventions ask."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
