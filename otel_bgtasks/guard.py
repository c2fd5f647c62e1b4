"""Keep otel_bgtasks' own failures away from the user's tasks.

Everything otel_bgtasks does around a task runs inside ``with capture_internal_exceptions():`` (or, where
a value must come back, under :func:`internal_error`). A failure there is logged once per place it happens
(a broken exporter would otherwise log on every task), and the task runs exactly as it would uninstrumented.
"""

from __future__ import annotations

import logging
import threading
import traceback
from types import TracebackType

_logger = logging.getLogger("otel_bgtasks")
_seen: set[tuple[str, str, int]] = set()
_seen_lock = threading.Lock()


def internal_error(exc: BaseException) -> None:
    """Log ``exc``, raised inside otel_bgtasks, the first time it happens at its place."""
    try:
        frames = traceback.extract_tb(exc.__traceback__)
        filename, lineno = (frames[-1].filename, frames[-1].lineno or 0) if frames else ("?", 0)
        key = (type(exc).__qualname__, filename, lineno)
        with _seen_lock:
            if key in _seen:
                return
            _seen.add(key)
        _logger.error(
            "otel_bgtasks failed internally; the background task itself is unaffected, but its telemetry may be "
            "incomplete. Please report this.",
            exc_info=exc,
        )
    except Exception:
        pass  # logging itself failed: nothing safer is left to do


class _Guard:
    """Context manager: swallow and report an ``Exception`` raised inside otel_bgtasks.

    Cancellation and other ``BaseException`` s pass: they belong to the task, not to us.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, Exception):
            internal_error(exc)
            return True
        return False


_GUARD = _Guard()  # stateless: one instance serves every ``with``


def capture_internal_exceptions() -> _Guard:
    """Return the one shared guard; named as in sentry-sdk, where it is used the same way."""
    return _GUARD
