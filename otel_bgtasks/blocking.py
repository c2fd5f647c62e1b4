"""Measure how long an ``async def`` task holds the event loop between two awaits.

A ``time.sleep`` or a blocking client call inside an async task stops every other request on the
loop. Each step of a coroutine (one ``send`` into it) runs without yielding, so the longest step is
the longest freeze this task caused. Driving the coroutine step by step costs one generator switch
and one clock read per await.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from time import perf_counter
from typing import Any


class BlockingTimer:
    """Awaitable that runs ``coroutine`` unchanged and keeps its longest step in :attr:`max`."""

    __slots__ = ("_coroutine", "max")

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self._coroutine = coroutine
        self.max = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine = self._coroutine
        value: Any = None
        error: BaseException | None = None
        while True:
            started = perf_counter()
            try:
                yielded = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration as stop:
                self._note(perf_counter() - started)
                return stop.value
            except BaseException:
                self._note(perf_counter() - started)
                raise
            self._note(perf_counter() - started)
            try:
                value, error = (yield yielded), None
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # cancellation and throw() go into the task, as with a plain await
                value, error = None, exc

    def _note(self, held: float) -> None:
        if held > self.max:
            self.max = held
