"""pytest plugin: background tasks that fail, are skipped, dropped, refused or block the loop, caught in tests.

A route's test passes while its background task fails after the response, is skipped because an earlier
one failed, is never run, was given as a coroutine object, or freezes the event loop. This plugin shows it:

- the fixture ``background_tasks`` records every task of the test (:class:`otel_bgtasks.testing.TaskRecorder`):
  ``assert background_tasks.succeeded("send_welcome_email")``, ``.failed(...)``, ``.skipped``,
  ``.dropped``, ``.invalid``, ``.blocked``, ``.records``, ``.assert_all_succeeded()``;
- strict mode, ``--bgtasks-strict``, ``bgtasks_strict = true`` in the ini file, or
  ``@pytest.mark.bgtasks_strict`` on one test, fails each test in which a task had such a problem
  (``@pytest.mark.bgtasks_strict(False)`` exempts one test from it).

Registered under the ``pytest11`` entry point and inactive until asked for: this module imports pytest
and nothing else until a test uses the fixture or strict mode is on, and only then is otel_bgtasks
instrumented, for that test only, unless the app under test instrumented it itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Final

import pytest

from otel_bgtasks.config import UNSET, Unset  # the standard library only, as the package's __init__

if TYPE_CHECKING:
    from otel_bgtasks.testing import TaskRecorder

MARKER: Final = "bgtasks_strict"
_THRESHOLD_INI: Final = "bgtasks_blocking_threshold"


class _Recording:
    """A test's recorder, and how many of its problems the test was already failed for."""

    __slots__ = ("failed", "recorder", "reported")

    def __init__(self, recorder: TaskRecorder) -> None:
        self.recorder = recorder
        self.reported = 0
        self.failed = False  # the test was failed for its tasks' problems, which the message lists


# Per test item; weak, so that an item pytest let go of takes its recording along.
_recordings: weakref.WeakKeyDictionary[pytest.Item, _Recording] = weakref.WeakKeyDictionary()


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--bgtasks-strict``, and the ini options ``bgtasks_strict`` and ``bgtasks_blocking_threshold``."""
    group = parser.getgroup("otel_bgtasks", "background tasks (otel_bgtasks)")
    group.addoption(
        "--bgtasks-strict",
        action="store_true",
        default=False,
        help="fail every test in which a background task failed, was skipped, dropped, added as a coroutine "
        "object or blocked the event loop",
    )
    parser.addini("bgtasks_strict", type="bool", default=False, help="like --bgtasks-strict, for every run")
    parser.addini(
        _THRESHOLD_INI,
        default="",
        help="seconds an async def background task may hold the event loop before it counts as blocking "
        "(default 0.1, or OTEL_PYTHON_BGTASKS_BLOCKING_THRESHOLD; off: no measurement), when the app does "
        "not instrument otel_bgtasks itself",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; reject a bad threshold before any test runs."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(on=True): fail this test if one of its background tasks failed, was skipped, dropped, "
        f"added as a coroutine object or blocked the event loop; {MARKER}(False) exempts it from --bgtasks-strict",
    )
    _blocking_threshold(config)


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say so when strict mode is on for the whole run."""
    if _strict_run(config):
        return "otel_bgtasks: strict background tasks (a task that fails, is skipped or dropped fails its test)"
    return None


@pytest.fixture
def background_tasks(request: pytest.FixtureRequest) -> TaskRecorder:
    """Every background task of this test: ``.succeeded(name)``, ``.failed(name)``, ``.skipped``, ``.dropped``...

    Named like FastAPI's route parameter, but fixtures live apart from routes: both can be used at once.
    """
    return _start(request.node).recorder


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Strict tests record from before their fixtures are set up (a fixture may send requests)."""
    if _strict(item):
        _start(item)


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """After a test that passed: fail it, if strict, for the problems of its tasks."""
    recording = _recordings.get(item)
    if recording is not None and _strict(item):
        _fail_for_new_problems(recording, "")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """After a test that failed: its tasks' records, as a report section next to the captured output."""
    recording = _recordings.get(item)
    if recording is None or call.when != "call" or call.excinfo is None or recording.failed:
        return  # passed, or failed by us: the message lists the problems already
    if call.excinfo.errisinstance(pytest.skip.Exception):
        return
    from otel_bgtasks.testing import describe_records

    records = recording.recorder.records
    if records:
        item.add_report_section("call", "background tasks", describe_records(records))
    recording.reported = len(recording.recorder.problems)  # shown: not worth a teardown error as well


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After the fixtures' teardown (a server stopped, garbage collected): fail, if strict, for what came since."""
    recording = _recordings.get(item)
    if recording is None:
        return
    recording.recorder.settle()
    if _strict(item):
        _fail_for_new_problems(recording, " after the test's own code (at teardown)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, None]:
    """Stop recording once the test is over, whatever happened in its teardown."""
    yield
    recording = _recordings.pop(item, None)
    if recording is not None:
        recording.recorder.stop()


def _start(item: pytest.Item) -> _Recording:
    recording = _recordings.get(item)
    if recording is None:
        from otel_bgtasks.testing import TaskRecorder

        recording = _Recording(TaskRecorder(_blocking_threshold(item.config)))
        _recordings[item] = recording
        recording.recorder.start()
    return recording


def _fail_for_new_problems(recording: _Recording, when: str) -> None:
    problems = recording.recorder.problems[recording.reported :]
    if not problems:
        return
    from otel_bgtasks.testing import describe_records

    recording.reported += len(problems)
    recording.failed = True
    pytest.fail(
        f"{len(problems)} background task problem(s){when} (otel_bgtasks strict mode):\n"
        f"{describe_records(problems)}\n"
        f"(@pytest.mark.{MARKER}(False) exempts a test whose tasks are meant to fail.)",
        pytrace=False,
    )


def _strict_run(config: pytest.Config) -> bool:
    return bool(config.getoption("bgtasks_strict") or config.getini("bgtasks_strict"))


def _strict(item: pytest.Item) -> bool:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return _strict_run(item.config)
    on = marker.args[0] if marker.args else marker.kwargs.get("on", True)
    if not isinstance(on, bool):
        raise TypeError(f"@pytest.mark.{MARKER} takes True or False, not {on!r}")
    return on


def _blocking_threshold(config: pytest.Config) -> float | Unset | None:
    """The ini option, in seconds; ``off`` turns blocking detection off. Unset: otel_bgtasks' own default."""
    raw = str(config.getini(_THRESHOLD_INI)).strip()
    if not raw:
        return UNSET
    if raw.lower() in ("off", "none"):
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise pytest.UsageError(f"{_THRESHOLD_INI} = {raw!r}: give seconds above 0 (such as 0.25), or off")
    return seconds
