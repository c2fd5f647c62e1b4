"""Task arguments, for people who opt in with ``capture_args=True``: bounded, secrets redacted.

Arguments are the data a task works on (addresses, tokens, personal records). Nothing here runs
unless the user asked for it, and then a value whose name looks secret is never rendered at all:
keyword names, the parameter names positional arguments bind to, keys inside mappings, the fields of
dataclasses, attrs classes, pydantic models and namedtuples, and the first item of key/value pairs
(raw headers: ``[(b"authorization", b"Bearer ...")]``) are all checked, to a small depth. A positional
value whose parameter name cannot be known (``*args``, no signature) is shown by its type only.

An object is shown by its own ``repr`` unless that repr is one generated from the object's items or fields:
then those are walked (with redaction), as the generated repr would show them. The reprs walked are
recognised by where they come from (see :func:`_repr_origin`); any other ``__repr__`` was written by
someone who decided what to show (a DSN with its password masked), so it wins.

Rendering runs on the event loop, so its work is bounded by what is shown: containers are walked item
by item only until the text is full, never copied or sorted, whatever their size; a string (of any
class whose repr is the string's) is cut before it is repr'd.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import re
import sys
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import CodeType, MethodType
from typing import Any, Final, Literal, NamedTuple, cast

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
# A name longer than this is text, not a name; it is redacted rather than lowercased and searched in full.
_MAX_NAME: Final = 256

_SCALARS: Final = frozenset({int, float, bool, type(None)})
_STRINGS: Final = frozenset({str, bytes, bytearray})
_STRING_BASES: Final = (str, bytes, bytearray)
_STRING_REPRS: Final[tuple[object, ...]] = tuple(base.__repr__ for base in _STRING_BASES)
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

        A name that cannot even be read, or longer than a name can be, is treated as secret.
        """
        try:
            head = _head(key, _MAX_NAME + 1)  # cut first: a 50 MB key costs what a short one does
            if head is not None:
                key = head
            name = key.decode("latin-1") if isinstance(key, bytes | bytearray) else str(key)
            if len(name) > _MAX_NAME:
                return True
        except Exception:
            return True
        return self._secret_key.search(_normal(name)) is not None

    def render(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """``(args, kwargs)`` as lists of strings: ``repr(value)`` and ``"name=repr(value)"``.

        What ``func`` is called with: a ``functools.partial``'s own arguments come first, as the partial passes
        them. A positional value whose parameter name cannot be known (bound to ``*args``, or ``func`` has no
        signature) is shown by its type only, ``[redacted str]``: a decorator written without ``functools.wraps``
        takes ``(*args, **kwargs)``, and the password among them would otherwise go out in clear.

        Never raises: a value whose rendering fails becomes a placeholder such as ``<unrepresentable Foo>``.
        """
        called, args, kwargs = _unbound(func, args, kwargs)
        names = _parameter_names(called, len(args), kwargs)
        rendered_args = [
            _unnamed(value) if name is None else REDACTED if self.is_secret(name) else self._value(value)
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
            if isinstance(value, _STRING_BASES) and type(value).__repr__ in _STRING_REPRS:
                # A subclass whose repr is its base's, cut the same way; one with a repr of its own (say one that
                # masks) is a leaf like any other.
                text.write(repr(_head(value, text.room)))
                return
            shape = self._shape(value)
            if shape is None:  # a leaf: its own repr (only cut to length: its cost is the type's business)
                text.write(repr(value))
                return
            if isinstance(shape, str):  # a short description in place of its repr
                text.write(shape)
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

    def _shape(self, value: object) -> _Shape | str | None:
        """How to show an object: its members, a description, or ``None`` for a leaf shown by its own ``repr``."""
        cls = type(value)
        origin = _repr_origin(cls)
        if origin is None:  # a repr of its own: whatever it hides stays hidden
            return None
        if origin != "items":  # a repr generated from its fields: the fields it shows, redacted
            return _object(cls, self._named(_fields(value, origin)))
        if isinstance(value, Mapping):
            mapping = cast(Mapping[object, object], value)
            connection = _connection(mapping)
            if connection is not None:
                return connection
            members = ((key, item, self.is_secret(key)) for key, item in mapping.items())
            return _Shape(*_brackets(cls, dict), ": ", members)
        base = _collection_base(cls)
        if base is None:
            return None
        collection = cast(Collection[object], value)
        if not collection:
            return None  # set(), (), []: its own repr
        opening, closing = _brackets(cls, base)
        if base is tuple and len(collection) == 1:
            closing = "," + closing
        return _Shape(opening, closing, "", self._items(collection, base))

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


# Where an object's repr comes from (see _repr_origin): its items, the fields a generator made it from, or its own.
_Origin = Literal["items", "dataclass", "attrs", "pydantic", "namedtuple"]

# The reprs that list every item of a container, from the interpreter and from libraries whose containers hold
# requests' data (Starlette's Headers, QueryParams and FormData print every header and parameter): walked, so
# that keys are redacted. object's own repr shows nothing of the items; a Mapping that keeps it is walked too.
_ITEM_REPRS: Final[tuple[object, ...]] = tuple(
    cast(Any, t).__repr__ for t in (object, dict, list, tuple, set, frozenset, deque, OrderedDict, defaultdict)
)
_ITEM_REPR_MODULES: Final = frozenset({"collections", "starlette.datastructures"})


def _generated_by(cls: type[object]) -> tuple[CodeType, str]:
    """A generated ``__repr__``'s outer code (the recursion guard around it) and the file its own code is in."""
    generated = cast(Any, cls).__repr__
    return generated.__code__, inspect.unwrap(generated).__code__.co_filename


# dataclasses wraps the repr it makes (exec'd from text: its file is "<string>") in a recursion guard whose code
# is shared by all (dataclasses' own on Python 3.10-3.12, reprlib.recursive_repr's on 3.13). A hand-written repr
# under @reprlib.recursive_repr() has the same guard, but its own code is in a file.
_DATACLASS_REPR: Final = _generated_by(dataclasses.dataclass(type("_Probe", (), {})))
# namedtuple's repr is one function, defined in collections, shared (code and all) by every namedtuple.
_NAMEDTUPLE_REPR: Final = collections.namedtuple("_Probe", "x").__repr__.__code__  # pyright: ignore[reportUntypedNamedTuple]


def _repr_origin(cls: type[object]) -> _Origin | None:
    """Where ``repr()`` of an instance of ``cls`` comes from; ``None``: a ``__repr__`` someone wrote for it.

    Told by the function itself, never by the class's markers alone: ``@dataclass`` keeps a ``__repr__`` written in
    the class body, attrs' ``define`` too, and a subclass can override a generated repr.
    """
    function: Any = cls.__repr__
    if any(function is item_repr for item_repr in _ITEM_REPRS):
        return "items"
    code = getattr(function, "__code__", None)
    if code is _NAMEDTUPLE_REPR:
        return "namedtuple"
    if code is _DATACLASS_REPR[0] and _wrapped_file(function) == _DATACLASS_REPR[1]:
        return "dataclass"
    module = getattr(function, "__module__", None)
    if module in _ITEM_REPR_MODULES:
        return "items"
    if code is not None and (code.co_filename.startswith("<attrs generated") or module == "attr._make"):
        return "attrs"  # attrs >= 22.2 compiles its methods under that file name; older releases made closures
    if _is_pydantic_repr(function):
        return "pydantic"
    return None


def _wrapped_file(function: Any) -> str | None:
    wrapped = getattr(function, "__wrapped__", None)
    code = getattr(wrapped, "__code__", None)
    return code.co_filename if isinstance(code, CodeType) else None


def _is_pydantic_repr(function: object) -> bool:
    for name in ("pydantic", "pydantic.v1"):  # only a program that made a model has imported pydantic
        module = sys.modules.get(name)
        model = getattr(module, "BaseModel", None) if module is not None else None
        if isinstance(model, type) and function is cast(Any, model).__repr__:
            return True
    return False


def _head(value: object, length: int) -> object | None:
    """The first ``length`` items of a ``str``, ``bytes`` or ``bytearray`` of any class, sliced as its base slices."""
    base = next((base for base in _STRING_BASES if isinstance(value, base)), None)
    return None if base is None else cast(Any, base).__getitem__(value, slice(length))


def _repr_owner(cls: type[object]) -> type[object]:
    """The class whose ``__repr__`` instances of ``cls`` use: its fields are the ones that repr shows."""
    return next((base for base in cls.__mro__ if "__repr__" in base.__dict__), cls)


def _fields(value: object, origin: _Origin) -> Iterable[tuple[str | None, object]]:
    """The fields a generated repr shows, with their values (per-field attrs repr functions applied)."""
    if origin == "namedtuple":
        return zip(cast(tuple[str, ...], cast(Any, value)._fields), cast(tuple[object, ...], value), strict=False)
    if origin == "pydantic":  # its own repr shows __repr_args__ (fields without repr=False)
        return cast(Iterable[tuple[str | None, object]], value.__repr_args__())  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
    owner = _repr_owner(type(value))
    if origin == "dataclass":
        return ((f.name, getattr(value, f.name)) for f in dataclasses.fields(cast(Any, owner)) if f.repr)
    attributes = cast(tuple[Any, ...], getattr(owner, "__attrs_attrs__", ()))
    return (
        (a.name, _Verbatim(a.repr(getattr(value, a.name))) if callable(a.repr) else getattr(value, a.name))
        for a in attributes
        if a.repr is not False
    )


class _Verbatim:
    """Text shown as it is: what an attrs field's own repr function made of its value."""

    __slots__ = ("_text",)

    def __init__(self, text: object) -> None:
        self._text = str(text)

    def __repr__(self) -> str:
        return self._text


def _connection(value: object) -> str | None:
    """A Starlette ``Request``/``WebSocket`` as ``<Request GET /path>``; ``None`` for anything else.

    A connection is a Mapping over its ASGI scope, which holds the query string and every header: it is described,
    not walked.
    """
    requests = sys.modules.get("starlette.requests")
    connection = getattr(requests, "HTTPConnection", None) if requests is not None else None
    if not (isinstance(connection, type) and isinstance(value, connection)):
        return None
    scope = cast(Mapping[str, Any], cast(Any, value).scope)
    method = scope.get("method")
    return f"<{type(value).__name__}{f' {method}' if method else ''} {scope.get('path', '')}>"


def _collection_base(cls: type[object]) -> type[object] | None:
    return next((base for base in _BRACKETS if base is not dict and issubclass(cls, base)), None)


def _brackets(cls: type[object], base: type[object]) -> tuple[str, str]:
    opening, closing = _BRACKETS[base]
    return (opening, closing) if cls is base else (f"{cls.__name__}({opening}", f"{closing})")


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


def _unnamed(value: object) -> str:
    """A value whose name is unknown: its type only (a class's ``__qualname__`` is always a ``str``)."""
    return f"[redacted {type(value).__qualname__}]"


def _unbound(
    func: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[object, tuple[Any, ...], Mapping[str, Any]]:
    """The function a ``functools.partial`` calls, and the arguments it calls it with (the call's keywords win)."""
    while isinstance(func, functools.partial):
        partial = cast(functools.partial[object], func)
        func, args, kwargs = partial.func, (*partial.args, *args), {**partial.keywords, **kwargs}
    return func, args, kwargs


def _signature_of(func: object) -> tuple[str, ...] | None:
    """From ``inspect.signature``, which follows ``__wrapped__``: a decorator's (*args, **kwargs) is not the API."""
    try:
        parameters = inspect.signature(func).parameters.values()  # pyright: ignore[reportArgumentType]
    except Exception:  # TypeError/ValueError for most that have none; anything from a hostile __signature__
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in positional)


# inspect.signature costs microseconds: once per callable, as long as it lives.
_signatures: PerCallable[tuple[str, ...] | None] = PerCallable(_signature_of)


def _positional(func: object) -> tuple[str, ...] | None:
    """The names positional arguments given to ``func`` bind to, in order; ``None`` where that cannot be known.

    Past them, arguments go into ``*args``, whose name is the tuple's, not each value's.
    """
    if isinstance(func, MethodType):  # made anew at each attribute access: its function is what is remembered
        inner = _positional(func.__func__)
        return None if inner is None else inner[1:]  # the instance binds to the first parameter (or to *args)
    return _signatures.get(func)


def _parameter_names(func: object, count: int, keywords: Collection[str]) -> list[str | None]:
    """The parameter names ``count`` positional arguments bind to (``None`` where unknown).

    A parameter also given by keyword (``partial(send, user="ann")("s3cret")``), and every one after it, binds no
    positional argument: the call fails, and the value meant for the next parameter is not shown under its name.
    """
    names = _positional(func) or ()
    cut = next((i for i, name in enumerate(names) if name in keywords), len(names))
    return [names[i] if i < cut else None for i in range(count)]
