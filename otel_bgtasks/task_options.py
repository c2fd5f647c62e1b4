"""Per-function options, set where the task function is defined."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final, TypeVar

from otel_bgtasks.config import _parse_seconds  # pyright: ignore[reportPrivateUsage]

TIMEOUT_ATTRIBUTE: Final = "__otel_bgtasks_timeout__"
NOT_SET: Final = object()  # no @task_options timeout: instrument()'s applies

_F = TypeVar("_F", bound=Callable[..., Any])


def task_options(*, timeout: float | None) -> Callable[[_F], _F]:
    """Decorate a task function to give it its own ``timeout``, in seconds (``None``: no timeout).

    It overrides the ``timeout`` given to ``instrument()`` for every task that runs this function.
    The function itself is returned unchanged, so Starlette still sees whether it is ``async``::

        @otel_bgtasks.task_options(timeout=30)
        async def rebuild_index() -> None: ...
    """
    seconds = _parse_seconds("timeout")(timeout)

    def decorate(func: _F) -> _F:
        setattr(func, TIMEOUT_ATTRIBUTE, seconds)
        return func

    return decorate


def declared_timeout(*candidates: object) -> float | object | None:
    """The timeout ``@task_options`` gave the first of ``candidates`` that has one, else :data:`NOT_SET`.

    Each candidate is searched from the outside in, through the functions it wraps (``__wrapped__``):
    ``@task_options`` may sit above or below another decorator, and the outermost one is the last the
    user applied. Only what ``task_options`` stores counts: a ``Mock`` answers every attribute.
    """
    for candidate in candidates:
        try:
            holder = inspect.unwrap(candidate, stop=lambda layer: hasattr(layer, TIMEOUT_ATTRIBUTE))  # pyright: ignore[reportArgumentType]
        except ValueError:  # a __wrapped__ cycle
            holder = candidate
        timeout = getattr(holder, TIMEOUT_ATTRIBUTE, NOT_SET)
        if timeout is None or type(timeout) is float:
            return timeout
    return NOT_SET
