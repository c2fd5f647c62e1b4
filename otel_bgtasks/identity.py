"""What identifies a task's function: the callable object itself, held weakly.

Not its ``__code__``: every function one decorator wraps (``functools.wraps``, tenacity's ``@retry``,
backoff, a home-made ``@log_calls``) runs the decorator's one code object, so a cache keyed by code gives
all of them the first one's name, timeout and parameter names. Not equality either: a wrapt proxy
equals the function it wraps, and a callable dataclass instance is not even hashable. Keyed by
identity and held by a weak reference, an entry lives exactly as long as its callable, so closures
and classes made per request come and go without growing anything. And if an app keeps them all (a
registry of per-customer classes), past :data:`MAX_ENTRIES` a new callable's value is computed each time
instead of remembered.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Final, Generic, TypeVar

_V = TypeVar("_V")

MAX_ENTRIES: Final = 4096


class PerCallable(Generic[_V]):
    """``compute(callable)``, remembered while that callable lives.

    The values must not refer to their callable (they would keep it alive). A callable that cannot be
    weakly referenced (``str.upper`` and other method descriptors) is computed each time instead.
    """

    __slots__ = ("_compute", "_entries")

    def __init__(self, compute: Callable[[object], _V]) -> None:
        self._compute = compute
        self._entries: dict[int, tuple[weakref.ref[object], _V]] = {}

    def get(self, key: object) -> _V:
        """The value for ``key``, computed on first sight."""
        entry = self._entries.get(id(key))
        if entry is not None and entry[0]() is key:
            return entry[1]
        value = self._compute(key)
        if len(self._entries) >= MAX_ENTRIES:
            return value
        try:
            ref = weakref.ref(key, functools.partial(self._forget, id(key)))
        except TypeError:
            return value
        self._entries[id(key)] = (ref, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, key_id: int, ref: weakref.ref[object]) -> None:
        # Called by the garbage collector in any thread; the id may already hold a newer callable's entry.
        entry = self._entries.get(key_id)
        if entry is not None and entry[0] is ref:
            self._entries.pop(key_id, None)
