"""otel_bgtasks' hints reach stderr when no handler of the application's would show them, and only then.

Each case runs in a fresh interpreter: pytest's own handlers on the root logger (the log capture) are what
an application's handler is to otel_bgtasks, so the no-handler cases cannot happen in this process. A real
Starlette ``BackgroundTasks`` whose first task fails gives the two records: the ERROR ("failed (error)")
and the WARNING ("Skipped 1 background task(s)"). OpenTelemetry's handler is the SDK's ``LoggingHandler``
with an in-memory exporter, as opentelemetry-instrumentation-logging and
``OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED`` attach it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import logging
    import sys

    from opentelemetry.sdk.trace import TracerProvider
    from starlette.background import BackgroundTasks

    import otel_bgtasks

    case = sys.argv[1].split("+")
    exporter = None
    if "app" in case:  # first: basicConfig does nothing once the root logger has a handler
        logging.basicConfig(format="app: %(message)s")
    if "otel" in case:
        from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
        from opentelemetry.sdk._logs import export

        # InMemoryLogRecordExporter since SDK 1.39; its old name warns there.
        exporter = getattr(export, "InMemoryLogRecordExporter", None) or export.InMemoryLogExporter
        exporter = exporter()
        logger_provider = LoggerProvider()
        logger_provider.add_log_record_processor(export.SimpleLogRecordProcessor(exporter))
        logging.getLogger().addHandler(LoggingHandler(logger_provider=logger_provider))
    if "null" in case:
        logging.getLogger("otel_bgtasks").addHandler(logging.NullHandler())
    if "silenced" in case:
        logging.lastResort = None

    provider = TracerProvider()
    otel_bgtasks.instrument(tracer_provider=provider)


    def charge_card():
        raise RuntimeError("card declined")


    def send_receipt():
        pass


    tasks = BackgroundTasks()
    with provider.get_tracer("request").start_as_current_span("POST /order"):
        tasks.add_task(charge_card)
        tasks.add_task(send_receipt)
    try:
        asyncio.run(tasks())
    except RuntimeError:
        pass
    if exporter is not None:
        records = [getattr(data, "log_record", data) for data in exporter.get_finished_logs()]
        print("exported:", [str(record.body).split(" because")[0].split(":")[0] for record in records])
    """
)
FAILED = "Background task __main__.charge_card failed (error): RuntimeError: card declined [trace_id="
SKIPPED = (
    "Skipped 1 background task(s) because an earlier task in the same BackgroundTasks failed: __main__.send_receipt."
)


EXPORTED = "exported: ['Background task __main__.charge_card failed (error)', 'Skipped 1 background task(s)']"


def run(case: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=60, check=True)


def printed(stderr: str) -> list[str]:
    """The hints on stderr, in order, each with what its line starts with (the app's format prefix, if any)."""
    return [
        line[: line.index(hint)] + hint for line in stderr.splitlines() for hint in (FAILED, SKIPPED) if hint in line
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # No handler at all: what logging.lastResort prints, once (ours, not lastResort as well).
        ("bare", [FAILED, SKIPPED]),
        # Only OpenTelemetry's handler, which lastResort counts as a handler: printed all the same.
        ("otel", [FAILED, SKIPPED]),
        # The application's handler shows them, in its format; nothing of ours besides.
        ("app", [f"app: {FAILED}", f"app: {SKIPPED}"]),
        ("otel+app", [f"app: {FAILED}", f"app: {SKIPPED}"]),
        # The application silenced them, as it would silence lastResort.
        ("otel+null", []),
        ("otel+silenced", []),
    ],
)
def test_hints_on_stderr_unless_the_app_shows_or_silences_them(case: str, expected: list[str]) -> None:
    ran = run(case)
    assert printed(ran.stderr) == expected, ran.stderr
    if "otel" in case:  # the logs pipeline gets both records in every case
        assert EXPORTED in ran.stdout, ran.stdout


def test_handler_is_removed_with_the_instrumentation() -> None:
    import logging

    import otel_bgtasks
    from otel_bgtasks.last_resort import LastResort

    logger = logging.getLogger("otel_bgtasks")
    otel_bgtasks.uninstrument()
    before = list(logger.handlers)
    try:
        otel_bgtasks.instrument()
        assert [type(handler) for handler in logger.handlers if handler not in before] == [LastResort]
    finally:
        otel_bgtasks.uninstrument()
    assert logger.handlers == before
