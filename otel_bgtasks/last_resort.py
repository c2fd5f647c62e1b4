"""Our WARNING and ERROR lines reach the terminal when nothing of the application's would show them.

An application that configures no logging sees otel_bgtasks' hints ("Skipped 1 background task(s) ...",
"blocked the event loop ...") on stderr all the same: Python's ``logging.lastResort`` prints a record that
finds no handler. Under ``opentelemetry-instrument``, opentelemetry-instrumentation-logging (0.66b1 on;
the SDK's own handler with ``OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED=true``) puts a handler on the
root logger that sends records to the logs pipeline: ``lastResort`` is then never asked, and with
``--logs_exporter none`` the hints go nowhere. uvicorn changes nothing here: its logging config gives its
own loggers (``uvicorn``, ``uvicorn.access``) their handlers and leaves the root logger and ours alone
(``disable_existing_loggers`` false). That root handler is telemetry plumbing, not the application deciding
where its logs go.

So the ``otel_bgtasks`` logger gets :class:`LastResort` while otel_bgtasks is instrumented: it does what
``lastResort`` does (the same handler, so the same format, level and stream, and ``logging.lastResort =
None`` still silences it), counting OpenTelemetry's handlers as no handler. Any other handler on the way up
(the application's, pytest's, a ``NullHandler``) means the application decides, and it prints nothing.
Records still propagate: the logs pipeline gets every one, as before.
"""

from __future__ import annotations

import logging
from typing import Final

LOGGER: Final = logging.getLogger("otel_bgtasks")
# Handlers defined in these packages send records to the OpenTelemetry logs pipeline, not to a person.
_TELEMETRY_MODULE_PREFIX: Final = "opentelemetry."


class LastResort(logging.Handler):
    """``logging.lastResort`` for otel_bgtasks' records, blind to OpenTelemetry's export handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        """Print ``record`` as ``lastResort`` would, unless a handler of the application's will handle it."""
        try:
            last_resort = logging.lastResort
            if last_resort is None or record.levelno < last_resort.level or self._shown_elsewhere(record):
                return
            last_resort.handle(record)
        except Exception:
            self.handleError(record)

    def _shown_elsewhere(self, record: logging.LogRecord) -> bool:
        """Whether a handler other than this one and OpenTelemetry's is on the record's way up."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for handler in logger.handlers:
                if handler is not self and not type(handler).__module__.startswith(_TELEMETRY_MODULE_PREFIX):
                    return True
            logger = logger.parent if logger.propagate else None
        return False


_handler: Final = LastResort()


def install() -> None:
    """Attach the handler to the ``otel_bgtasks`` logger (once)."""
    if _handler not in LOGGER.handlers:
        LOGGER.addHandler(_handler)


def remove() -> None:
    """Detach it."""
    LOGGER.removeHandler(_handler)
