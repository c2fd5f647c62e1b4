"""Task arguments, for people who opt in with ``capture_args=True``: bounded, secrets redacted.

Arguments are the data a task works on (addresses, tokens, personal records). Nothing here runs
unless the user asked for it, and then a value whose name looks secret is never rendered at all:
keyword names, the parameter names positional arguments bind to, keys inside mappings, the fields of
dataclasses, attrs classes, pydantic models and namedtuples, and the first item of key/value pairs
(raw headers: ``[(b"authorization", b"Bearer ...")]``) are all checked, to a small depth.

Rendering runs on the event loop, so its work is bounded by what is shown: containers are walked item
by item only until the text is full, never copied or sorted, whatever their size.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import MethodType
from typing import Any, Final, NamedTuple, cast

from otel_bgtasks.identity import PerCallable

REDACTED: Final = "[redacted]"
DEFAULT_SECRET_KEYS: Final = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "authorization",
    "auth",
    "bearer",
    "api_key",
    "apikey",
    "cookie",
    "session",
    "credential",
    "private_key",
)
_MAX_DEPTH: Final = 4

_SCALARS: Final = frozenset({int, float, bool, type(None)})
_STRINGS: Final = frozenset({str, bytes, bytearray})
_BRACKETS: Final[dict[type[object], tuple[str, str]]] = {
    dict: ("{", "}"),
    list: ("[", "]"),
    tuple: ("(", ")"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
    deque: ("deque([", "])"),
}

# One item of an object being rendered: its label (a field name, a mapping key, or None), its value,
# and whether the label says the value is a secret.
_Member = tuple[object, object, bool]


class ArgumentCapture:
    """Renders a task's arguments as span attribute values."""

    def __init__(self, max_length: int, extra_secret_keys: Iterable[str] = ()) -> None:
        self._max_length = max_length
        secret_keys = sorted({_normal(key) for key in (*DEFAULT_SECRET_KEYS, *extra_secret_keys)})
        self._secret_key = re.compile("|".join(map(re.escape, secret_keys)))  # one pass over the name

    def is_secret(self, key: object) -> bool:
        """Whether a name looks like it holds a secret (substring match, ``-`` and case ignored).

        A name that cannot even be read is treated as secret.
        """
        try:
            name = _normal(key.decode("latin-1") if isinstance(key, bytes) else str(key))
        except Exception:
            return True
        return self._secret_key.search(name) is not None

    def render(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """``(args, kwargs)`` as lists of strings: ``repr(value)`` and ``"name=repr(value)"``.

        Never raises: a value whose rendering fails becomes a placeholder such as ``<unrepresentable Foo>``.
        """
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
        text = _Text(self._max_length)
        self._write(text, value, 0)
        return text.result()

    def _write(self, text: _Text, value: object, depth: int) -> None:
        if text.full:
            return
        start = text.mark()
        try:
            if type(value) in _SCALARS:
                text.write(repr(value))
                return
            if type(value) in _STRINGS:  # only what can be shown is sliced off and repr'd
                text.write(repr(value[: text.room]))  # pyright: ignore[reportIndexIssue, reportUnknownArgumentType]
                return
            shape = self._shape(value)
            if shape is None:  # a leaf: its own repr (only cut to length: its cost is the type's business)
                text.write(repr(value))
                return
            text.write(shape.opening)
            if depth >= _MAX_DEPTH:
                text.write("...")
            else:
                self._write_members(text, shape.label_end, shape.members, depth + 1)
            text.write(shape.closing)
        except Exception:  # whatever part of it was written gives way to a placeholder
            text.rewind(start)
            text.write(f"<unrepresentable {type(value).__qualname__}>")

    def _write_members(self, text: _Text, label_end: str, members: Iterator[_Member], depth: int) -> None:
        for index, (label, item, secret) in enumerate(members):
            if text.full:
                return  # the rest is never looked at
            if index:
                text.write(", ")
            if label is not None:
                if label_end == "=":  # a field name, shown bare as in the class's own repr
                    text.write(str(label))
                else:  # a mapping key, itself a value
                    self._write(text, label, depth)
                text.write(label_end)
            if secret:
                text.write(repr(REDACTED))
            else:
                self._write(text, item, depth)

    def _shape(self, value: object) -> _Shape | None:
        """How to show an object that holds other values; ``None`` for a leaf, shown by its own ``repr``."""
        cls = type(value)
        if isinstance(value, Mapping):
            mapping = cast(Mapping[object, object], value)
            members = ((key, item, self.is_secret(key)) for key, item in mapping.items())
            return _Shape(*_brackets(cls, dict), ": ", members)
        base = _collection_base(cls)
        if base is not None:
            collection = cast(Collection[object], value)
            fields = getattr(cls, "_fields", None)
            if base is tuple and isinstance(fields, tuple):  # a namedtuple: its field names are kept
                return _object(cls, self._named(zip(cast(tuple[str, ...], fields), collection, strict=False)))
            if not collection:
                return None  # set(), (), []: its own repr
            opening, closing = _brackets(cls, base)
            if base is tuple and len(collection) == 1:
                closing = "," + closing
            return _Shape(opening, closing, "", self._items(collection, base))
        fields = self._fields(value)
        return None if fields is None else _object(cls, fields)

    def _fields(self, value: object) -> Iterator[_Member] | None:
        """The fields of a dataclass, attrs class or pydantic model instance, those its own repr shows."""
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            shown = [field.name for field in dataclasses.fields(value) if field.repr]
            return self._named((name, getattr(value, name)) for name in shown)
        attributes = getattr(type(value), "__attrs_attrs__", None)
        if isinstance(attributes, tuple):  # an attrs class
            shown = [a.name for a in cast(tuple[Any, ...], attributes) if a.repr is not False]
            return self._named((name, getattr(value, name)) for name in shown)
        if _is_pydantic_model(value):  # its own repr shows __repr_args__ (fields without repr=False)
            return self._named(cast(Iterable[tuple[str | None, object]], value.__repr_args__()))  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
        return None

    def _items(self, items: Collection[object], base: type[object]) -> Iterator[_Member]:
        if base in (list, tuple):
            sequence = cast(list[object] | tuple[object, ...], items)
            if len(sequence) == 2 and type(sequence[0]) in (str, bytes) and self.is_secret(sequence[0]):
                # A key/value pair, as in raw headers [(b"authorization", b"Bearer ...")]: the value is secret.
                return iter(((None, sequence[0], False), (None, sequence[1], True)))
        return ((None, item, False) for item in items)

    def _named(self, pairs: Iterable[tuple[str | None, object]]) -> Iterator[_Member]:
        return ((name, item, name is not None and self.is_secret(name)) for name, item in pairs)


class _Shape(NamedTuple):
    """An object that holds other values, as it is shown: ``{opening}{label}{label_end}{value}, ...{closing}``."""

    opening: str
    closing: str
    label_end: str  # "=" after a field name, ": " after a mapping key
    members: Iterator[_Member]


def _object(cls: type[object], members: Iterator[_Member]) -> _Shape:
    """A class instance shown as its constructor call, ``UserCreate(username='ann', password='[redacted]')``."""
    return _Shape(f"{cls.__name__}(", ")", "=", members)


def _collection_base(cls: type[object]) -> type[object] | None:
    return next((base for base in _BRACKETS if base is not dict and issubclass(cls, base)), None)


def _brackets(cls: type[object], base: type[object]) -> tuple[str, str]:
    opening, closing = _BRACKETS[base]
    return (opening, closing) if cls is base else (f"{cls.__name__}({opening}", f"{closing})")


def _is_pydantic_model(value: object) -> bool:
    for name in ("pydantic", "pydantic.v1"):  # only a program that made a model has imported pydantic
        module = sys.modules.get(name)
        model = getattr(module, "BaseModel", None) if module is not None else None
        if isinstance(model, type) and isinstance(value, model):
            return True
    return False


class _Text:
    """Text with a length limit: once past the limit it takes nothing more, and the walk stops."""

    __slots__ = ("_length", "_limit", "_parts")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._length = 0

    @property
    def room(self) -> int:
        """Characters still taken: one past the limit, which marks the text as cut."""
        return self._limit + 1 - self._length

    @property
    def full(self) -> bool:
        """Whether the text is past its limit."""
        return self._length > self._limit

    def write(self, text: str) -> None:
        """Append ``text``, cut to the room left."""
        text = text[: max(self.room, 0)]
        self._parts.append(text)
        self._length += len(text)

    def mark(self) -> int:
        """A point to :meth:`rewind` to."""
        return len(self._parts)

    def rewind(self, mark: int) -> None:
        """Drop what was written since ``mark``."""
        while len(self._parts) > mark:
            self._length -= len(self._parts.pop())

    def result(self) -> str:
        """The text, ending with "…" where it was cut."""
        text = "".join(self._parts)
        return text if len(text) <= self._limit else text[: self._limit - 1] + "…"


def _normal(key: str) -> str:
    return key.lower().replace("-", "_")


# The names positional arguments bind to, then the name of *args (None: there is none).
_Positional = tuple[tuple[str, ...], "str | None"]


def _signature_of(func: object) -> _Positional | None:
    """From ``inspect.signature``, which follows ``__wrapped__``: a decorator's (*args, **kwargs) is not the API."""
    try:
        parameters = inspect.signature(func).parameters.values()  # pyright: ignore[reportArgumentType]
    except Exception:  # TypeError/ValueError for most that have none; anything from a hostile __signature__
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(p.name for p in parameters if p.kind in positional)
    star = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    return names, star


# inspect.signature costs microseconds: once per callable, as long as it lives.
_signatures: PerCallable[_Positional | None] = PerCallable(_signature_of)


def _positional(func: object) -> _Positional | None:
    """What positional arguments given to ``func`` bind to; ``None`` where that cannot be known."""
    if isinstance(func, functools.partial):
        partial = cast(functools.partial[object], func)
        inner = _positional(partial.func)
        if inner is None:
            return None
        names = inner[0][len(partial.args) :]
        # A parameter the partial sets by keyword, and every one after it, takes no more positional arguments.
        cut = next((i for i, name in enumerate(names) if name in partial.keywords), len(names))
        return names[:cut], inner[1]
    if isinstance(func, MethodType):  # made anew at each attribute access: its function is what is remembered
        inner = _positional(func.__func__)
        if inner is None or not inner[0]:
            return inner  # (*args): the instance went into it, the rest still does
        return inner[0][1:], inner[1]  # the instance binds to the first parameter
    return _signatures.get(func)


def _parameter_names(func: object, count: int) -> list[str | None]:
    """The parameter names ``count`` positional arguments bind to (``None`` where unknown)."""
    positional = _positional(func)
    if positional is None:
        return [None] * count
    names, star = positional
    return [names[i] if i < len(names) else star for i in range(count)]
