"""Task arguments, for people who opt in with ``capture_args=True``: truncated, secrets redacted.

Arguments are the data a task works on (addresses, tokens, personal records). Nothing here runs
unless the user asked for it, and then a value whose name looks secret is never rendered at all:
keyword names, the parameter names positional arguments bind to, and keys inside dicts, lists and
tuples (to a small depth) are all checked.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Iterable, Mapping
from types import CodeType
from typing import Any, Final, cast

REDACTED: Final = "[redacted]"
DEFAULT_SECRET_KEYS: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "cookie",
    "session",
    "credential",
    "private_key",
)
_MAX_DEPTH: Final = 4


class ArgumentCapture:
    """Renders a task's arguments as span attribute values."""

    def __init__(self, max_length: int, extra_secret_keys: Iterable[str] = ()) -> None:
        self._max_length = max_length
        self._secret_keys = tuple({_normal(key) for key in (*DEFAULT_SECRET_KEYS, *extra_secret_keys)})
        self._repr = reprlib.Repr()
        self._repr.maxstring = self._repr.maxother = max_length
        self._repr.maxlevel = _MAX_DEPTH

    def is_secret(self, key: object) -> bool:
        """Whether a name looks like it holds a secret (substring match, ``-`` and case ignored)."""
        name = _normal(str(key))
        return any(secret in name for secret in self._secret_keys)

    def render(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """``(args, kwargs)`` as lists of strings: ``repr(value)`` and ``"name=repr(value)"``."""
        names = _parameter_names(func, len(args))
        rendered_args = [
            REDACTED if name is not None and self.is_secret(name) else self._value(value)
            for name, value in zip(names, args, strict=True)
        ]
        rendered_kwargs = [
            f"{key}={REDACTED if self.is_secret(key) else self._value(value)}" for key, value in kwargs.items()
        ]
        return rendered_args, rendered_kwargs

    def _value(self, value: object) -> str:
        text = self._repr.repr(self._redacted(value, 0))
        return text if len(text) <= self._max_length else text[: self._max_length - 1] + "…"

    def _redacted(self, value: object, depth: int) -> object:
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, Mapping):
            mapping = cast(Mapping[object, object], value)
            return {
                key: REDACTED if self.is_secret(key) else self._redacted(item, depth + 1)
                for key, item in mapping.items()
            }
        if isinstance(value, (list, tuple)):
            items = [self._redacted(item, depth + 1) for item in cast(Iterable[object], value)]
            return items if isinstance(value, list) else tuple(items)
        return value


def _normal(key: str) -> str:
    return key.lower().replace("-", "_")


_signatures: dict[CodeType, tuple[inspect.Parameter, ...] | None] = {}


def _parameters(func: Callable[..., Any]) -> tuple[inspect.Parameter, ...] | None:
    """``func``'s parameters; cached per code object for plain functions (inspect.signature costs microseconds)."""
    code: CodeType | None = getattr(func, "__code__", None)  # bound methods and partials: computed each time
    if code is not None and code in _signatures:
        return _signatures[code]
    try:
        parameters = tuple(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        parameters = None
    if code is not None and len(_signatures) < 1024:
        _signatures[code] = parameters
    return parameters


def _parameter_names(func: Callable[..., Any], count: int) -> list[str | None]:
    """The parameter names ``count`` positional arguments bind to (``None`` where unknown)."""
    parameters = _parameters(func)
    if parameters is None:
        return [None] * count
    names: list[str | None] = []
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            names.extend([parameter.name] * (count - len(names)))
            break
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
    names.extend([None] * (count - len(names)))
    return names[:count]
