"""``BackgroundTasksInstrumentor``: patches Starlette's background task classes process-wide."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.config import resolve
from otel_bgtasks.metrics import TaskMetrics
from otel_bgtasks.package import _instruments  # pyright: ignore[reportPrivateUsage]
from otel_bgtasks.peers import ContribFastAPI, contrib_original_call
from otel_bgtasks.sentry import SentryForwarder, sentry_installed
from otel_bgtasks.version import __version__
from otel_bgtasks.wrappers import TaskWrappers

instrumentor_lock = threading.RLock()


def _fastapi_overrides_call() -> bool:
    """FastAPI >= 0.163 overrides ``BackgroundTasks.__call__`` to add its native span.

    Older releases subclass Starlette's class without overriding it, or (before 0.101) re-export
    Starlette's class itself: patching "fastapi.background.BackgroundTasks.__call__" there would wrap
    Starlette's twice.
    """
    if importlib.util.find_spec("fastapi") is None:
        return False
    from fastapi import background
    from starlette.background import BackgroundTasks

    return background.BackgroundTasks is not BackgroundTasks and "__call__" in vars(background.BackgroundTasks)


class BackgroundTasksInstrumentor(BaseInstrumentor):
    """Instrumentor for Starlette and FastAPI background tasks.

    ``instrument()`` accepts ``tracer_provider``, ``meter_provider`` and the options listed in the
    README; ``opentelemetry-instrument`` calls it with none, leaving the options to
    ``OTEL_PYTHON_BGTASKS_*`` environment variables.
    """

    _patched_fastapi = False
    _contrib: ContribFastAPI | None = None
    _wrappers: TaskWrappers | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """The Starlette range ``opentelemetry-instrument`` checks before loading us."""
        return _instruments

    def instrument(self, **kwargs: Any) -> None:
        """Patch, once: BaseInstrumentor checks and sets its flag without a lock."""
        with instrumentor_lock:
            super().instrument(**kwargs)  # type: ignore[no-untyped-call]

    def uninstrument(self, **kwargs: Any) -> None:
        """Unpatch, under the same lock as :meth:`instrument`."""
        with instrumentor_lock:
            super().uninstrument(**kwargs)  # type: ignore[no-untyped-call]

    def _instrument(self, **kwargs: Any) -> None:
        from starlette import background

        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        options = resolve(kwargs)
        tracer = trace.get_tracer(__name__, __version__, tracer_provider)
        arguments = (
            ArgumentCapture(options.capture_args_max_length, options.redact_keys) if options.capture_args else None
        )
        sentry = None
        if options.sentry is True or (options.sentry == "auto" and sentry_installed()):
            sentry = SentryForwarder(options.sentry, arguments)
        wrappers = TaskWrappers(tracer, TaskMetrics(meter_provider), options, arguments, sentry)
        wrappers.bypass_call = contrib_original_call()
        self._wrappers = wrappers
        self._contrib = ContribFastAPI(wrappers)

        wrap_function_wrapper(background, "BackgroundTask.__init__", wrappers.init_task)
        wrap_function_wrapper(background, "BackgroundTask.__call__", wrappers.call_task)
        wrap_function_wrapper(background, "BackgroundTasks.__call__", wrappers.call_tasks)
        wrap_function_wrapper(background, "run_in_threadpool", wrappers.run_in_threadpool)
        self._patched_fastapi = _fastapi_overrides_call()
        if self._patched_fastapi:
            wrap_function_wrapper("fastapi.background", "BackgroundTasks.__call__", wrappers.call_fastapi_tasks)
        self._contrib.install()

    def _uninstrument(self, **kwargs: Any) -> None:
        from starlette import background

        unwrap(background.BackgroundTask, "__init__")
        unwrap(background.BackgroundTask, "__call__")
        unwrap(background.BackgroundTasks, "__call__")
        unwrap(background, "run_in_threadpool")
        if self._patched_fastapi:
            from fastapi import background as fastapi_background

            unwrap(fastapi_background.BackgroundTasks, "__call__")
            self._patched_fastapi = False
        if self._contrib is not None:
            self._contrib.remove()
            self._contrib = None
        if self._wrappers is not None:
            self._wrappers.retired = True
            self._wrappers = None
