"""Where otel_bgtasks lacks something, it says what to install, in both forms: released package and clone.

Each case hides a module in a fresh interpreter (``sys.modules[name] = None``: its import then fails as if
it were not installed), so that this process's own modules stay as they are.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BOTH_FORMS = "pip install 'otel_bgtasks[{0}]' (released package) or pip install -e '.[{0}]' (from a clone)"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "use",
    [
        "otel_bgtasks.instrument()",
        "otel_bgtasks.BackgroundTasksInstrumentor().instrument()",
    ],
)
def test_without_starlette_instrument_says_what_to_install(use: str) -> None:
    ran = run_python(
        "import sys\nsys.modules['starlette'] = None  # as after pip install otel_bgtasks, no extra\n"
        "import otel_bgtasks\n"
        f"try:\n    {use}\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc.name, '|', exc)\n"
    )
    assert ran.returncode == 0, ran.stderr
    raised, _, message = ran.stdout.strip().partition(" | ")
    assert raised == "ImportError starlette", ran.stdout  # not a bare ModuleNotFoundError
    assert message.startswith(
        "otel_bgtasks traces Starlette's background tasks (FastAPI's too), and Starlette is not"
    ), message
    assert "pip install fastapi, or pip install starlette" in message
    assert BOTH_FORMS.format("instruments") in message


def test_importing_the_package_needs_no_starlette() -> None:
    """The pytest plugin imports the package in every test run of a project that has otel_bgtasks installed."""
    ran = run_python("import sys\nsys.modules['starlette'] = None\nimport otel_bgtasks, otel_bgtasks.pytest_plugin")
    assert ran.returncode == 0, ran.stderr


def test_sentry_required_without_sentry_sdk_says_what_to_install() -> None:
    ran = run_python(
        "import sys\nsys.modules['sentry_sdk'] = None\nimport otel_bgtasks\n"
        "try:\n    otel_bgtasks.instrument(sentry=True)\nexcept ImportError as exc:\n    print(exc)\n"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("otel_bgtasks was asked to forward failures to Sentry (sentry=True) but sentry-sdk"), (
        ran.stdout
    )
    assert f"installed: {BOTH_FORMS.format('sentry')}; or pass sentry='auto' or False." in ran.stdout
