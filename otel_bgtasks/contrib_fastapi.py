"""Living with opentelemetry-instrumentation-fastapi, which also patches ``BackgroundTask.__call__``.

Its ``instrument_app()`` replaces ``BackgroundTask.__call__`` with a bare ``BackgroundTask {name}``
span, once per process, keeping the original under ``BackgroundTask._otel_original_call`` and
skipping the patch while that attribute exists. Its ``uninstrument_app()`` puts that original back and
deletes the attribute. To keep exactly one span per task in every order:

- contrib patched first: our wrapper calls the original it kept, not its bare span (the bypass);
- we patched first: we set the attribute ourselves for the length of contrib's ``instrument_app()`` call, so
  that it leaves ``__call__`` alone, and take it away after: the app never sees it on ``BackgroundTask``;
- contrib uninstruments an app later: we put our wrapper and the attribute back right after;
- contrib instruments an app that ``otel_bgtasks.instrument(app)`` gave request spans: ours are withdrawn
  first, so that each request keeps one server span.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Final

from wrapt import wrap_function_wrapper

from otel_bgtasks.guard import capture_internal_exceptions, internal_error
from otel_bgtasks.request_spans import withdraw_request_spans
from otel_bgtasks.wrappers import CONTRIB_FASTAPI, TaskWrappers

MARKER: Final = "_otel_original_call"
CONTRIB: Final = CONTRIB_FASTAPI


def contrib_original_call() -> Any:
    """The original ``__call__`` contrib kept, if contrib has patched ``BackgroundTask`` already."""
    from starlette.background import BackgroundTask

    return vars(BackgroundTask).get(MARKER)


class ContribFastAPICoordinator:
    """Our side of the arrangement, installed after ``BackgroundTask.__call__`` is wrapped."""

    def __init__(self, wrappers: TaskWrappers) -> None:
        self._wrappers = wrappers
        self._our_call: Any = None
        self._instrumentor: Any = None  # contrib's FastAPIInstrumentor class, once watched
        self._saved_uninstrument_app: Any = None
        self._saved_instrument_app: Any = None

    def install(self) -> None:
        """Note our wrapper; contrib's ``(un)instrument_app`` are watched by :meth:`watch` once contrib is imported."""
        from starlette.background import BackgroundTask

        self._our_call = vars(BackgroundTask)["__call__"]

    def watch(self, contrib: ModuleType) -> None:
        """Wrap contrib's ``uninstrument_app``, once; ``contrib`` is its module, already imported."""
        if self._instrumentor is not None:
            return
        self._instrumentor = contrib.FastAPIInstrumentor
        # A staticmethod: opentelemetry's unwrap() would put back a plain function, so keep the original.
        self._saved_uninstrument_app = vars(self._instrumentor)["uninstrument_app"]
        self._saved_instrument_app = vars(self._instrumentor)["instrument_app"]
        wrap_function_wrapper(self._instrumentor, "uninstrument_app", self._after_uninstrument_app)
        wrap_function_wrapper(self._instrumentor, "instrument_app", self._before_instrument_app)

    def remove(self) -> None:
        """Undo :meth:`install` and :meth:`watch`; call after ``BackgroundTask.__call__`` is unwrapped."""
        from starlette.background import BackgroundTask

        if self._our_call is not None and vars(BackgroundTask).get(MARKER) is self._our_call:
            delattr(BackgroundTask, MARKER)
        self._our_call = None
        if self._instrumentor is not None:
            setattr(self._instrumentor, "uninstrument_app", self._saved_uninstrument_app)  # noqa: B010
            setattr(self._instrumentor, "instrument_app", self._saved_instrument_app)  # noqa: B010
            self._instrumentor = None
            self._saved_uninstrument_app = None
            self._saved_instrument_app = None

    def _before_instrument_app(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with capture_internal_exceptions():
            app = args[0] if args else kwargs.get("app")
            if not getattr(app, "_is_instrumented_by_opentelemetry", False):
                withdraw_request_spans(app)
            tracer_provider = kwargs.get("tracer_provider")
            if tracer_provider is not None:  # the request spans go there: the task spans follow them
                self._wrappers.follow(tracer_provider)
        claimed = self._claim_marker()
        try:
            return wrapped(*args, **kwargs)
        finally:
            if claimed:
                self._release_marker()

    def _claim_marker(self) -> bool:
        """Show contrib our wrapper as the original it keeps, so that it does not patch ``__call__`` over it."""
        from starlette.background import BackgroundTask

        try:
            if self._our_call is None or MARKER in vars(BackgroundTask):
                return False  # contrib's own marker: it patched first, and we bypass its span
            setattr(BackgroundTask, MARKER, self._our_call)
        except Exception as exc:
            internal_error(exc)
            return False
        return True

    def _release_marker(self) -> None:
        from starlette.background import BackgroundTask

        with capture_internal_exceptions():
            if vars(BackgroundTask).get(MARKER) is self._our_call:
                delattr(BackgroundTask, MARKER)

    def _after_uninstrument_app(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            self._reassert()
        except Exception as exc:
            internal_error(exc)
        return result

    def _reassert(self) -> None:
        from starlette import background

        if self._our_call is None:
            return
        current = vars(background.BackgroundTask).get("__call__")
        if current is not self._our_call:
            if _wraps_the_same(current, self._our_call):
                # Contrib put back what it had kept: our wrapper, bound to the class on the way.
                background.BackgroundTask.__call__ = self._our_call
            else:
                # Contrib put back Starlette's own __call__, dropping our wrapper around its span.
                self._wrappers.bypass_call = None
                wrap_function_wrapper(background, "BackgroundTask.__call__", self._wrappers.call_task)
                self._our_call = vars(background.BackgroundTask)["__call__"]
                self._wrappers.claim_call(self._our_call)


def _wraps_the_same(current: Any, ours: Any) -> bool:
    """Whether ``current`` is our wrapper as contrib put it back: bound to the class on the way, so not ``ours``.

    wrapt's public ``__wrapped__`` names what both wrap: Starlette's own ``__call__``.
    """
    wrapped = getattr(ours, "__wrapped__", None)
    return wrapped is not None and getattr(current, "__wrapped__", None) is wrapped
