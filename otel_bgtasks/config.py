"""Options: from ``instrument()`` or ``OTEL_PYTHON_BGTASKS_*`` variables, and per function from ``@task_options``.

Explicit arguments win. An invalid argument raises at ``instrument()`` time, where the mistake is
made; an invalid environment variable is logged and its default used, because ``opentelemetry-instrument``
gives no place to raise to and the application must still start.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Final, Literal, TypeVar

_logger = logging.getLogger("otel_bgtasks")

ENV_PREFIX = "OTEL_PYTHON_BGTASKS_"

Mode = Literal["child", "link"]
MODES: tuple[Mode, ...] = ("child", "link")


class Unset(Enum):
    """The type of :data:`UNSET`: an option not given, left to its environment variable or default."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True)
class Options:
    """Resolved options. The README's options table documents each one."""

    mode: Mode = "child"
    continue_on_error: bool = False
    timeout: float | None = None
    blocking_threshold: float | None = 0.1
    strict: bool = False
    sentry: bool | Literal["auto"] = "auto"
    capture_args: bool = False
    capture_args_max_length: int = 256
    redact_keys: tuple[str, ...] = ()
    queue_duration_metric: bool = False
    request_metrics_end_at_response: bool = True


def _parse_mode(value: object) -> Mode:
    text = str(value).strip().lower()
    if text not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {value!r}")
    return text


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_bool(name: str) -> Callable[[object], bool]:
    def parse(value: object) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")

    return parse


def _parse_seconds(name: str) -> Callable[[object], float | None]:
    """Seconds > 0; ``None`` (or "none"/"off" in the environment) turns the feature off."""

    def parse(value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "off"}):
            return None
        try:
            seconds = float(value)  # pyright: ignore[reportArgumentType]
        except (TypeError, ValueError):
            seconds = float("nan")
        if isinstance(value, bool) or not seconds > 0 or seconds == float("inf"):
            raise ValueError(
                f"{name} must be a number of seconds greater than 0, or None to turn it off; got {value!r}"
            )
        return seconds

    return parse


def _parse_sentry(value: object) -> bool | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _parse_bool("sentry")(value)
    except ValueError:
        raise ValueError(f"sentry must be 'auto', true or false, got {value!r}") from None


def _parse_length(value: object) -> int:
    try:
        length = int(str(value))
    except ValueError:
        length = 0
    if isinstance(value, bool) or length < 16:
        raise ValueError(f"capture_args_max_length must be a whole number of characters >= 16, got {value!r}")
    return length


def _parse_keys(value: object) -> tuple[str, ...]:
    """A list of names, or in the environment a comma-separated string."""
    items: Iterable[object] = value.split(",") if isinstance(value, str) else value  # pyright: ignore[reportAssignmentType]
    try:
        keys = tuple(str(item).strip() for item in items if str(item).strip())
    except TypeError:
        raise ValueError(f"redact_keys must be a list of key names, got {value!r}") from None
    return keys


_PARSERS: dict[str, Callable[[object], Any]] = {
    "mode": _parse_mode,
    "continue_on_error": _parse_bool("continue_on_error"),
    "timeout": _parse_seconds("timeout"),
    "blocking_threshold": _parse_seconds("blocking_threshold"),
    "strict": _parse_bool("strict"),
    "sentry": _parse_sentry,
    "capture_args": _parse_bool("capture_args"),
    "capture_args_max_length": _parse_length,
    "redact_keys": _parse_keys,
    "queue_duration_metric": _parse_bool("queue_duration_metric"),
    "request_metrics_end_at_response": _parse_bool("request_metrics_end_at_response"),
}


def resolve(arguments: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Options:
    """Merge ``arguments`` over the environment over the defaults.

    Raises:
        TypeError: an argument names no option.
        ValueError: an argument's value is not allowed; the message lists what is.
    """
    unknown = sorted(set(arguments) - set(_PARSERS))
    if unknown:
        raise TypeError(
            f"otel_bgtasks got unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(_PARSERS))}"
        )
    environ = os.environ if environ is None else environ
    _warn_unknown_variables(environ)
    values: dict[str, Any] = {}
    for field in fields(Options):
        parse = _PARSERS[field.name]
        if field.name in arguments:
            values[field.name] = parse(arguments[field.name])
            continue
        variable = ENV_PREFIX + field.name.upper()
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            values[field.name] = parse(raw)
        except ValueError as exc:
            _logger.warning("Ignoring %s=%r: %s. Using the default %r.", variable, raw, exc, field.default)
    return Options(**values)


def explicit(**arguments: object) -> dict[str, object]:
    """The arguments that were given, without those left :data:`UNSET`."""
    return {name: value for name, value in arguments.items() if value is not UNSET}


def differences(active: Options, arguments: Mapping[str, object]) -> list[str]:
    """``"name=value (in effect: other)"`` for each given argument that differs from the options in effect."""
    wanted = resolve(arguments, environ={})
    return [
        f"{name}={getattr(wanted, name)!r} (in effect: {getattr(active, name)!r})"
        for name in sorted(arguments)
        if getattr(wanted, name) != getattr(active, name)
    ]


_warned_variables: set[str] = set()


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelt ``OTEL_PYTHON_BGTASKS_*`` variable would be ignored silently: name the closest valid one."""
    known = [ENV_PREFIX + name.upper() for name in _PARSERS]
    for variable in environ:
        if not variable.startswith(ENV_PREFIX) or variable in known or variable in _warned_variables:
            continue
        _warned_variables.add(variable)
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"valid ones: {', '.join(known)}"
        _logger.warning("Ignoring %s: otel_bgtasks has no such option; %s", variable, hint)


# -- per task function: @task_options ---------------------------------------------------------------

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
