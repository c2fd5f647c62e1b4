"""Per-function options, set where the task function is defined."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from otel_bgtasks.config import _parse_seconds  # pyright: ignore[reportPrivateUsage]

TIMEOUT_ATTRIBUTE: Final = "__otel_bgtasks_timeout__"

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
