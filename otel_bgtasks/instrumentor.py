"""``BackgroundTasksInstrumentor``: patches Starlette's background task classes process-wide."""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from collections.abc import Collection
from types import ModuleType
from typing import Any, Final

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import NoOpTracerProvider
from wrapt import register_post_import_hook, wrap_function_wrapper

from otel_bgtasks import last_resort, request_metrics
from otel_bgtasks.arguments import ArgumentCapture
from otel_bgtasks.config import Options, differences, resolve
from otel_bgtasks.contrib_fastapi import CONTRIB, ContribFastAPICoordinator, contrib_original_call
from otel_bgtasks.guard import capture_internal_exceptions, internal_error
from otel_bgtasks.listeners import add_listener, remove_listener
from otel_bgtasks.metrics import task_metrics
from otel_bgtasks.package import _instruments  # pyright: ignore[reportPrivateUsage]
from otel_bgtasks.request_spans import traces_with_a_given_provider
from otel_bgtasks.sentry import SentryForwarder, sentry_installed
from otel_bgtasks.setup_checks import arm, note_unseen_provider
from otel_bgtasks.wrappers import TaskWrappers

instrumentor_lock = threading.RLock()
_logger = logging.getLogger("otel_bgtasks")
_guard = capture_internal_exceptions()
# BaseInstrumentor.instrument()'s own arguments, which opentelemetry-instrument passes.
_BASE_INSTRUMENTOR_ARGUMENTS: Final = frozenset({"skip_dep_check", "raise_exception_on_conflict"})

# Patched when the application imports them, never imported by us: in a Starlette-only process that
# would load FastAPI, pydantic and contrib (over a hundred modules, more than 10 MiB) for nothing.
_FASTAPI: Final = "fastapi.background"
_LAZY: Final = (_FASTAPI, CONTRIB)
# wrapt's post-import hooks cannot be unregistered: register them once per process; they patch only
# if otel_bgtasks is instrumented when they fire.
_hooks_registered = False
_hooks_lock = threading.Lock()
_exit_registered = False


def watch_imports() -> None:
    """Register the post-import hooks, once; call it before taking ``instrumentor_lock``.

    wrapt < 1.15 runs hooks while holding its own lock and our hook then takes ``instrumentor_lock``:
    calling into wrapt while holding ``instrumentor_lock`` could deadlock with an import in another thread.
    """
    global _hooks_registered
    with _hooks_lock:
        if _hooks_registered:
            return
        _hooks_registered = True
    for name in _LAZY:
        # Fires at once if the module is imported already: harmless, patching is idempotent.
        register_post_import_hook(_imported, name)


def _imported(module: ModuleType) -> None:
    """Post-import hook: patch ``module`` if otel_bgtasks is instrumented now."""
    try:
        with instrumentor_lock:
            BackgroundTasksInstrumentor().patch_lazy(module)
    except Exception as exc:
        internal_error(exc)  # raising here would fail the application's import


def _fastapi_overrides_call(background: ModuleType) -> bool:
    """FastAPI >= 0.163 overrides ``BackgroundTasks.__call__`` to add its native span.

    Older releases subclass Starlette's class without overriding it, or (before 0.101) re-export
    Starlette's class itself: patching "fastapi.background.BackgroundTasks.__call__" there would wrap
    Starlette's twice.
    """
    from starlette.background import BackgroundTasks

    return background.BackgroundTasks is not BackgroundTasks and "__call__" in vars(background.BackgroundTasks)


class BackgroundTasksInstrumentor(BaseInstrumentor):
    """Instrumentor for Starlette and FastAPI background tasks.

    ``instrument()`` accepts ``tracer_provider``, ``meter_provider`` and the options listed in the
    README; ``opentelemetry-instrument`` calls it with none, leaving the options to
    ``OTEL_PYTHON_BGTASKS_*`` environment variables.
    """

    _fastapi_tasks: type | None = None  # fastapi.background.BackgroundTasks, once its __call__ is wrapped
    _contrib: ContribFastAPICoordinator | None = None
    _wrappers: TaskWrappers | None = None
    _options: Options | None = None
    _providers: tuple[object, object] = (None, None)
    _sentry: SentryForwarder | None = None
    # Set by instrument_stand_in() to its wrappers: the next instrument() call replaces them without a word.
    _stand_in: TaskWrappers | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """The Starlette range ``opentelemetry-instrument`` checks before loading us."""
        return _instruments

    def instrument(self, **kwargs: Any) -> None:
        """Patch, once; takes the options of :func:`otel_bgtasks.instrument`, by the same names.

        BaseInstrumentor checks and sets its flag without a lock. Instrumenting again changes nothing,
        and a WARNING names the options that were asked for and ignored.
        """
        watch_imports()  # before the lock: see there
        with instrumentor_lock:
            if self.is_instrumented_by_opentelemetry:
                if self._stand_in is None:
                    self._warn_ignored(kwargs)
                    return
                super().uninstrument()  # the app's own options win
            super().instrument(**kwargs)

    def instrument_stand_in(self, **kwargs: Any) -> object | None:
        """Instrument, unless instrumented already, as a stand-in that any ``instrument()`` call replaces.

        For the pytest plugin, which must see tasks without deciding how the app under test is
        instrumented: an app that calls ``instrument()`` itself, at import or in a fixture, gets its own
        options and providers, and no "instrumented already" warning.

        Returns:
            A token for :meth:`uninstrument_stand_in`, or ``None`` if otel_bgtasks was instrumented already.
        """
        watch_imports()
        with instrumentor_lock:
            if self.is_instrumented_by_opentelemetry:
                return None
            super().instrument(**kwargs)
            self._stand_in = self._wrappers
            return self._stand_in

    def uninstrument_stand_in(self, token: object | None) -> None:
        """Undo :meth:`instrument_stand_in`, unless its instrumentation was replaced or removed since."""
        with instrumentor_lock:
            if token is not None and token is self._stand_in:
                super().uninstrument()

    def _warn_ignored(self, kwargs: dict[str, Any]) -> None:
        arguments = {name: value for name, value in kwargs.items() if name not in _BASE_INSTRUMENTOR_ARGUMENTS}
        providers = {"tracer_provider": 0, "meter_provider": 1}
        ignored = [
            f"{name}={value!r}"
            for name, value in arguments.items()
            if name in providers and value is not None and value is not self._providers[providers[name]]
        ]
        if self._options is not None:
            ignored += differences(self._options, {k: v for k, v in arguments.items() if k not in providers})
        if ignored:
            _logger.warning(
                "otel_bgtasks is instrumented already; ignoring %s. Call otel_bgtasks.uninstrument() first to "
                "instrument with other options.",
                ", ".join(ignored),
            )

    def uninstrument(self, **kwargs: Any) -> None:
        """Unpatch, under the same lock as :meth:`instrument`."""
        with instrumentor_lock:
            super().uninstrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        from starlette import background

        last_resort.install()  # first: resolving the options may warn
        tracer_provider = kwargs.pop("tracer_provider", None)
        meter_provider = kwargs.pop("meter_provider", None)
        options = resolve({k: v for k, v in kwargs.items() if k not in _BASE_INSTRUMENTOR_ARGUMENTS})
        self._options = options
        self._providers = (tracer_provider, meter_provider)
        arguments = (
            ArgumentCapture(options.capture_args_max_length, options.redact_keys) if options.capture_args else None
        )
        if options.sentry is True or (options.sentry == "auto" and sentry_installed()):
            self._sentry = SentryForwarder(options.sentry, arguments)
            add_listener(self._sentry)
        wrappers = TaskWrappers(tracer_provider, task_metrics(meter_provider), options, arguments)
        global _exit_registered
        if not _exit_registered:  # once per process; after the app's providers in the usual set-up: see settle()
            _exit_registered = True
            atexit.register(self.settle)
        arm(wrappers.spans_recorded, spans_wanted=not isinstance(tracer_provider, NoOpTracerProvider))
        wrappers.bypass_call = contrib_original_call()
        self._wrappers = wrappers
        self._contrib = ContribFastAPICoordinator(wrappers)

        wrap_function_wrapper(background, "BackgroundTask.__init__", wrappers.init_task)
        wrap_function_wrapper(background, "BackgroundTask.__call__", wrappers.call_task)
        wrappers.claim_call(vars(background.BackgroundTask)["__call__"])
        wrap_function_wrapper(background, "BackgroundTasks.__call__", wrappers.call_tasks)
        wrap_function_wrapper(background, "run_in_threadpool", wrappers.run_in_threadpool)
        self._contrib.install()
        request_metrics.install(self._follow_middleware, options.request_metrics_end_at_response)
        for name in _LAZY:
            if name in sys.modules:
                self.patch_lazy(sys.modules[name])
        # Otherwise the hooks watch_imports() registered patch them when they are imported.

    def follow(self, tracer_provider: Any) -> None:
        """Send task spans to ``tracer_provider``, the app's request spans' own, unless one was given to us."""
        if self._wrappers is not None and tracer_provider is not None:
            self._wrappers.follow(tracer_provider)

    def _follow_middleware(self, tracer_provider: Any, middleware: Any) -> None:
        """An ``OpenTelemetryMiddleware`` made while instrumented: task spans follow the provider it was given."""
        if tracer_provider is not None:
            self.follow(tracer_provider)
        elif traces_with_a_given_provider(middleware):  # given a tracer: contrib's instrument_app() (0.48b0 on)
            note_unseen_provider(
                "contrib's instrument_app(), called before otel_bgtasks.instrument(), hands its "
                "OpenTelemetryMiddleware a tracer, not the provider"
            )

    def settle(self) -> None:
        """Tell the tasks dropped in reference cycles that no garbage collection has freed yet (atexit).

        Registered at the first ``instrument()``, usually after the application made its providers: atexit
        runs it before their shutdown, whose last export then counts them.
        """
        wrappers = self._wrappers
        if wrappers is not None:
            with _guard:
                wrappers.settle()

    def patch_lazy(self, module: ModuleType) -> None:
        """Patch FastAPI's or contrib's module, once imported, unless uninstrumented or patched already."""
        if self._wrappers is None or self._contrib is None:
            return
        if module.__name__ == CONTRIB:
            self._contrib.watch(module)
        elif self._fastapi_tasks is None and _fastapi_overrides_call(module):
            wrap_function_wrapper(module, "BackgroundTasks.__call__", self._wrappers.call_fastapi_tasks)
            self._fastapi_tasks = module.BackgroundTasks

    def _uninstrument(self, **kwargs: Any) -> None:
        from starlette import background

        unwrap(background.BackgroundTask, "__init__")
        unwrap(background.BackgroundTask, "__call__")
        unwrap(background.BackgroundTasks, "__call__")
        unwrap(background, "run_in_threadpool")
        if self._fastapi_tasks is not None:
            unwrap(self._fastapi_tasks, "__call__")
            self._fastapi_tasks = None
        if self._contrib is not None:
            self._contrib.remove()
            self._contrib = None
        request_metrics.remove()
        if self._wrappers is not None:
            with _guard:
                self._wrappers.settle()  # a task dropped in a reference cycle is told while it can be
            self._wrappers.retired = True
            self._wrappers = None
        if self._sentry is not None:
            remove_listener(self._sentry)
            self._sentry = None
        self._options = None
        self._providers = (None, None)
        self._stand_in = None
        last_resort.remove()
