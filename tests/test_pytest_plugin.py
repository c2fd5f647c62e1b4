"""The pytest plugin (otel_bgtasks/pytest_plugin.py): small example suites, run by pytester, pass and fail as expected.

Each suite is a FastAPI app (APP) and a test file as a user would write them. They run in this process
(``runpytest_inprocess``: fast, and the reports can be read one by one) except where the point is what a
fresh process imports or does by default. The app under test never mentions otel_bgtasks.
"""

from __future__ import annotations

import gc
import textwrap
import warnings
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.trace import NoOpTracerProvider

import otel_bgtasks
import otel_bgtasks.testing  # imported here, so that pytester's runs do not import (and drop) their own copy
from otel_bgtasks.testing import TaskRecorder

with warnings.catch_warnings():
    # Starlette 1.x wants httpx2 for its TestClient and warns when it finds httpx: imported once, here, so
    # that the example suites' imports find it loaded (httpx2 needs anyio 4.10, above the oldest stack's).
    warnings.simplefilter("ignore")
    import fastapi.testclient  # noqa: F401  # pyright: ignore[reportUnusedImport]

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent

APP = """
    import asyncio
    import time

    from fastapi import BackgroundTasks, FastAPI

    app = FastAPI()


    def send_welcome_email(address: str) -> None:
        pass


    def charge_card() -> None:
        raise ValueError("card declined")


    def send_receipt() -> None:
        pass


    async def send_email(address: str) -> None:
        await asyncio.sleep(0)


    async def build_report() -> None:
        time.sleep(0.25)  # the mistake: a blocking call in an async def task


    def poll_status() -> None:
        asyncio.get_running_loop()  # the mistake: there is no event loop in a def task's worker thread


    @app.post("/signup")
    async def signup(address: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_welcome_email, address)
        return {"status": "ok"}


    @app.post("/order")
    def order(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(charge_card)
        background_tasks.add_task(send_receipt)
        return {"status": "ok"}


    @app.post("/notify")
    async def notify(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_email, "a@example.com")
        return {"status": "ok"}


    @app.post("/coroutine")
    async def coroutine(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_email("a@example.com"))  # the mistake: called, not passed
        return {"status": "ok"}


    @app.post("/forgotten")
    async def forgotten() -> dict[str, str]:
        tasks = BackgroundTasks()  # the mistake: never attached to the response
        tasks.add_task(send_welcome_email, "a@example.com")
        return {"status": "ok"}


    @app.post("/report")
    async def report(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(build_report)
        return {"status": "ok"}


    @app.post("/poll")
    async def poll(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(poll_status)
        return {"status": "ok"}
"""

# The inner sessions' add_task(send_email(...)) coroutines, freed in reference cycles at a later collection:
# otel_bgtasks closes one only when nothing else holds it, so Python warns for these, as uninstrumented.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'send_email' was never awaited:RuntimeWarning")

INI = """
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    filterwarnings =
        ignore:Using .httpx. with .starlette.testclient.
"""

HEADER = """
    import httpx
    import pytest
    from fastapi.testclient import TestClient

    from app import app

    client = TestClient(app, raise_server_exceptions=False)  # a failing task must not fail the request here
"""

PROBLEMS = ["/order", "/coroutine", "/forgotten", "/report", "/poll"]

ROUTES = (
    HEADER
    + """

    def test_signup():
        assert client.post("/signup", params={"address": "a@example.com"}).status_code == 200


    @pytest.mark.parametrize("path", ["/order", "/coroutine", "/forgotten", "/report", "/poll"])
    def test_route(path):
        assert client.post(path).status_code == 200
"""
)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A folder with the example app, an ini file, and the repository's tests/ importable (for _servers)."""
    pytester.makeini(INI)
    pytester.makepyfile(app=APP)
    pytester.syspathinsert(TESTS)
    return pytester


def write_tests(pytester: pytest.Pytester, body: str, name: str = "test_routes") -> None:
    pytester.makepyfile(**{name: textwrap.dedent(HEADER) + textwrap.dedent(body)})


def failures(result: pytest.RunResult, when: str = "call") -> dict[str, str]:
    """The failure text of each test that failed in the phase ``when``, by test name."""
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    return {
        report.nodeid.partition("::")[2]: str(report.longrepr)
        for report in reports
        if report.failed and report.when == when
    }


# -- Strict mode -------------------------------------------------------------------------------------


def test_strict_flag_fails_each_test_whose_task_failed_was_skipped_dropped_refused_or_blocked(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_routes=ROUTES)
    result = suite.runpytest_inprocess("--bgtasks-strict")

    result.assert_outcomes(passed=1, failed=5)
    failed = failures(result)
    assert set(failed) == {f"test_route[{path}]" for path in PROBLEMS}
    order = failed["test_route[/order]"]
    assert "2 background task problem(s) (otel_bgtasks strict mode)" in order
    assert "- app.charge_card failed after " in order
    assert "ValueError: card declined. It left unrun: app.send_receipt." in order
    assert "- app.send_receipt was skipped: app.charge_card failed before it in the same BackgroundTasks" in order
    coroutine = failed["test_route[/coroutine]"]
    assert "given a coroutine object, send_email(...) called instead of passed" in coroutine
    assert "add_task(send_email, *args, **kwargs)" in coroutine
    assert "app.py:" in coroutine  # where the mistake is
    assert (
        "not callable" not in coroutine
    )  # Starlette's own TypeError, as it runs the coroutine, is not a second problem
    forgotten = failed["test_route[/forgotten]"]
    assert "Background task app.send_welcome_email was never run: it was created at " in forgotten
    assert "return it as the response's background=" in forgotten
    report = failed["test_route[/report]"]
    assert "app.build_report succeeded in " in report
    assert "Background task app.build_report blocked the event loop for 0.2" in report
    assert "Make it a plain `def`" in report
    poll = failed["test_route[/poll]"]
    assert "app.poll_status failed after " in poll and "RuntimeError: no running event loop" in poll
    assert "Hint: A def task runs in a worker thread with no event loop" in poll
    assert "otel_bgtasks: strict background tasks" in result.stdout.str()  # the header says it is on


def test_strict_ini_option_does_the_same(suite: pytest.Pytester) -> None:
    suite.makeini(textwrap.dedent(INI) + "bgtasks_strict = true\n")
    write_tests(
        suite,
        """
        def test_signup():
            client.post("/signup", params={"address": "a@example.com"})


        def test_order():
            client.post("/order")
        """,
    )
    result = suite.runpytest_inprocess()
    result.assert_outcomes(passed=1, failed=1)
    assert "ValueError: card declined" in failures(result)["test_order"]


def test_marker_makes_one_test_strict_and_false_exempts_one(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        @pytest.mark.bgtasks_strict
        def test_marked():
            client.post("/order")


        def test_not_marked():
            client.post("/order")


        @pytest.mark.bgtasks_strict(False)
        def test_exempt():
            client.post("/order")
        """,
    )
    result = suite.runpytest_inprocess()
    result.assert_outcomes(passed=2, failed=1)
    assert set(failures(result)) == {"test_marked"}

    result = suite.runpytest_inprocess("--bgtasks-strict")
    result.assert_outcomes(passed=1, failed=2)
    assert set(failures(result)) == {"test_marked", "test_not_marked"}


def test_strict_with_a_real_server(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        from _servers import serving


        def test_order_on_a_real_server():
            with serving(app) as server:  # uvicorn in a thread; leaving waits for its tasks
                assert httpx.post(server.url + "/order").status_code == 200


        def test_signup_on_a_real_server():
            with serving(app) as server:
                assert httpx.post(server.url + "/signup", params={"address": "a@example.com"}).status_code == 200
        """,
    )
    result = suite.runpytest_inprocess("--bgtasks-strict")
    result.assert_outcomes(passed=1, failed=1)
    failed = failures(result)["test_order_on_a_real_server"]
    assert "ValueError: card declined" in failed and "app.send_receipt was skipped" in failed


@pytest.mark.parametrize("instrumented_by", ["the exempt test's fixture", "the app"])
def test_strict_fails_a_test_for_its_own_tasks_only(suite: pytest.Pytester, instrumented_by: str) -> None:
    """A session-scoped server: the exempt test's task fails (and skips, and drops) during the next, strict test.

    Each task belongs to the test that was running when it was created: the strict test that follows is
    not failed for it; one that makes its own failing task still is, for its own only.
    """
    exempt_fixture = "background_tasks" if instrumented_by == "the exempt test's fixture" else ""
    instrument = "otel_bgtasks.instrument()" if instrumented_by == "the app" else ""
    write_tests(
        suite,
        f"""
        import gc
        import time

        import otel_bgtasks
        from fastapi import BackgroundTasks, FastAPI

        from _servers import serving

        {instrument}
        late_app = FastAPI()
        kept = []


        def charge_card_later():
            time.sleep(0.3)
            raise ValueError("card declined later")


        def send_receipt():
            pass


        @late_app.post("/order")
        def order(background_tasks: BackgroundTasks):
            background_tasks.add_task(charge_card_later)
            background_tasks.add_task(send_receipt)


        @pytest.fixture(scope="session")
        def server():
            with serving(late_app) as running:
                yield running


        @pytest.mark.bgtasks_strict(False)
        def test_a_exempt(server, {exempt_fixture or "request"}):
            assert httpx.post(server.url + "/order").status_code == 200
            forgotten = BackgroundTasks()
            forgotten.add_task(send_receipt)
            kept.append(forgotten)  # dropped during the next test


        def test_b_strict(server):
            time.sleep(0.6)  # the exempt test's task fails meanwhile, and skips the receipt
            kept.clear()
            gc.collect()


        def test_c_strict_with_its_own_failure(server):
            assert httpx.post(server.url + "/order").status_code == 200
            time.sleep(0.6)
        """,
    )
    result = suite.runpytest_inprocess("--bgtasks-strict")
    result.assert_outcomes(passed=2, failed=1)
    failed = failures(result)
    assert set(failed) == {"test_c_strict_with_its_own_failure"}
    message = failed["test_c_strict_with_its_own_failure"]
    assert "2 background task problem(s)" in message
    assert message.count("card declined later") == 1 and message.count("send_receipt was skipped") == 1


def test_strict_fails_at_teardown_for_a_task_that_ends_when_a_fixture_stops_the_server(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        import threading

        from fastapi import BackgroundTasks, FastAPI

        from _servers import serving

        released = threading.Event()
        slow_app = FastAPI()


        def charge_card_slowly():
            released.wait(10)
            raise ValueError("card declined at last")


        @slow_app.post("/order")
        def order(background_tasks: BackgroundTasks):
            background_tasks.add_task(charge_card_slowly)


        @pytest.fixture
        def server():
            with serving(slow_app) as running:
                yield running
                released.set()  # the task ends while the server stops, after the test's own code


        def test_order(server):
            assert httpx.post(server.url + "/order").status_code == 200
        """,
    )
    result = suite.runpytest_inprocess("--bgtasks-strict")
    result.assert_outcomes(passed=1, errors=1)
    failed = failures(result, when="teardown")["test_order"]
    assert "1 background task problem(s) after the test's own code (at teardown)" in failed
    assert "test_routes.charge_card_slowly failed after " in failed and "ValueError: card declined at last" in failed


def test_a_test_failing_on_its_own_shows_its_tasks_and_is_not_failed_twice(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        def test_breaks(background_tasks):
            client.post("/order")
            raise KeyError("the test's own failure")
        """,
    )
    result = suite.runpytest_inprocess("--bgtasks-strict")
    result.assert_outcomes(failed=1)  # no teardown error on top
    result.stdout.fnmatch_lines(
        [
            "*Captured background tasks call*",
            "- app.send_receipt was skipped: app.charge_card failed before it*",
            "- app.charge_card failed after *ValueError: card declined*",
        ]
    )


def test_the_failure_log_line_says_where_the_task_raised(suite: pytest.Pytester) -> None:
    """Not ``wrappers.py:0``, and no all-zero ids: the task's own file and line, its message, its trace or none."""
    write_tests(
        suite,
        """
        def test_breaks(background_tasks):
            client.post("/order")
            raise KeyError("to show the captured log")
        """,
    )
    result = suite.runpytest_inprocess("-o", "log_level=ERROR")
    result.assert_outcomes(failed=1)
    raised = 1 + textwrap.dedent(APP).lstrip().splitlines().index('    raise ValueError("card declined")')
    (line,) = [line for line in result.stdout.lines if "Background task app.charge_card failed" in line]
    assert line.startswith(f"ERROR    otel_bgtasks:app.py:{raised} Background task app.charge_card failed (error): ")
    assert "ValueError: card declined [" in line
    assert "0000000000000000" not in line


# -- The fixture ---------------------------------------------------------------------------------------

RECORDS = """
from _servers import serving

from app import send_welcome_email


def test_a_sync_task(background_tasks):
    client.post("/signup", params={"address": "a@example.com"})
    (record,) = background_tasks.records
    assert (record.name, record.function_name) == ("send_welcome_email", "app.send_welcome_email")
    assert record.outcome == "success"
    assert record.execution == "threadpool" and record.error is None and not record.blocked
    assert record.duration >= 0 and record.queue_duration >= 0 and record.threadpool_wait >= 0
    assert record.blocking is None  # measured for async def tasks only
    for name in ("send_welcome_email", "app.send_welcome_email", send_welcome_email):
        assert background_tasks.succeeded(name)
    assert not background_tasks.failed("send_welcome_email")
    background_tasks.assert_all_succeeded()
    background_tasks.assert_no_problems()


def test_an_async_task(background_tasks):
    client.post("/notify")
    (record,) = background_tasks.records
    assert record.execution == "async" and record.outcome == "success"
    assert 0 <= record.blocking < 0.1 and not record.blocked and record.threadpool_wait is None


def test_a_failure_and_the_task_it_skipped(background_tasks):
    client.post("/order")
    failed = background_tasks.failed("charge_card")
    assert failed
    (failure,) = failed.records
    assert isinstance(failure.error, ValueError) and str(failure.error) == "card declined"
    assert failure.left_unrun == ("app.send_receipt",)
    (skipped,) = background_tasks.skipped
    assert skipped.name == "send_receipt" and skipped.execution is None and skipped.duration is None
    assert "app.charge_card failed before it" in str(skipped)
    assert not background_tasks.succeeded("send_receipt")
    assert [r.outcome for r in background_tasks.problems] == ["skipped", "error"]


def test_a_known_mistake_behind_a_failure(background_tasks):
    client.post("/poll")
    (failure,) = background_tasks.failed("poll_status").records
    assert failure.diagnosis == "event_loop_conflict"
    assert failure.hint.startswith("A def task runs in a worker thread with no event loop")


def test_a_dropped_task(background_tasks):
    client.post("/forgotten")
    (dropped,) = background_tasks.dropped
    assert dropped.name == "send_welcome_email" and dropped.outcome == "dropped"
    assert dropped.site.rpartition(":")[0].endswith("app.py")


def test_a_coroutine_object(background_tasks):
    client.post("/coroutine")
    (invalid,) = background_tasks.records  # and not Starlette's TypeError as it runs it
    assert invalid.outcome == "invalid" and invalid.name == "send_email"
    assert background_tasks.invalid == [invalid]


def test_a_blocking_task(background_tasks):
    client.post("/report")
    (blocked,) = background_tasks.blocked
    assert blocked.name == "build_report" and blocked.outcome == "success" and blocked.blocking >= 0.25
    background_tasks.assert_all_succeeded()  # it succeeded...
    with pytest.raises(AssertionError, match="blocked the event loop for 0.2"):
        background_tasks.assert_no_problems()  # ...but strict mode would fail it


async def test_httpx_async_client(background_tasks):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as async_client:
        await async_client.post("/order")
    assert background_tasks.failed("charge_card")
    assert [r.name for r in background_tasks.skipped] == ["send_receipt"]


def test_a_real_server(background_tasks):
    with serving(app) as server:
        httpx.post(server.url + "/order")
        skipped = background_tasks.wait_for("send_receipt")  # tasks run after the response
        assert skipped.outcome == "skipped"
        assert background_tasks.failed("charge_card")
"""


def test_fixture_records_each_task_with_what_happened(suite: pytest.Pytester) -> None:
    write_tests(suite, RECORDS)
    result = suite.runpytest_inprocess()
    result.assert_outcomes(passed=9)


def test_fixture_assertion_messages_say_what_happened(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        def test_succeeded(background_tasks):
            client.post("/order")
            assert background_tasks.succeeded("charge_card")


        def test_never_ran(background_tasks):
            client.post("/signup", params={"address": "a@example.com"})
            assert background_tasks.succeeded("send_receipt")


        def test_did_not_fail(background_tasks):
            client.post("/signup", params={"address": "a@example.com"})
            assert background_tasks.failed("send_welcome_email")


        def test_nothing_skipped(background_tasks):
            client.post("/order")
            assert not background_tasks.skipped


        def test_nothing_blocked(background_tasks):
            client.post("/report")
            assert not background_tasks.blocked


        def test_all_succeeded(background_tasks):
            for path in ("/signup?address=a", "/order", "/coroutine", "/forgotten", "/poll"):
                client.post(path)
            background_tasks.assert_all_succeeded()


        def test_wait_for(background_tasks):
            background_tasks.wait_for("send_receipt", timeout=0.05)
        """,
    )
    result = suite.runpytest_inprocess()
    result.assert_outcomes(failed=7)
    failed = failures(result)
    assert (
        "AssertionError: assert charge_card did not succeed: app.charge_card failed after " in failed["test_succeeded"]
    )
    assert "ValueError: card declined. It left unrun: app.send_receipt." in failed["test_succeeded"]
    assert (
        "send_receipt never ran: no task of that name ended, was skipped or dropped. "
        "Recorded: app.send_welcome_email (success)"
    ) in failed["test_never_ran"]
    assert "send_welcome_email did not fail: app.send_welcome_email succeeded in " in failed["test_did_not_fail"]
    assert (
        "assert not [<app.send_receipt was skipped: app.charge_card failed before it" in failed["test_nothing_skipped"]
    )
    assert "blocked the event loop for 0.2" in failed["test_nothing_blocked"]
    every = failed["test_all_succeeded"]
    assert "5 of 6 background tasks did not succeed:" in every
    for expected in (
        "- app.send_receipt was skipped",
        "- app.charge_card failed after",
        "- add_task()/BackgroundTask() was given a coroutine object",
        "- Background task app.send_welcome_email was never run",
        "- app.poll_status failed after ",
        "Hint: A def task runs in a worker thread",
    ):
        assert expected in every
    assert "otel_bgtasks/testing.py" not in every  # the traceback ends at the test's own line
    assert "send_receipt was recorded 0 time(s) in 0.05 s, not 1. Recorded meanwhile: none" in failed["test_wait_for"]


def test_blocking_threshold_ini_option(suite: pytest.Pytester) -> None:
    write_tests(
        suite,
        """
        def test_report(background_tasks):
            client.post("/report")
            (record,) = background_tasks.records
            assert record.blocking >= 0.25 and not record.blocked
        """,
    )
    suite.runpytest_inprocess("-o", "bgtasks_blocking_threshold=1.5").assert_outcomes(passed=1)
    result = suite.runpytest_inprocess("-o", "bgtasks_blocking_threshold=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bgtasks_blocking_threshold = 'soon': give seconds above 0 (such as 0.25), or off*"])


# -- Leaving the app under test alone ---------------------------------------------------------------------

SPANS = """
import otel_bgtasks
from otel_bgtasks import BackgroundTasksInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import app as example_app

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
seen = {}


@pytest.fixture
def traced_client():
    from fastapi import FastAPI

    app = FastAPI(telemetry={"tracer_provider": provider})  # FastAPI's own spans (0.163 on), with its provider
    app.router.routes.extend(example_app.router.routes)
    exporter.clear()
    return TestClient(app, raise_server_exceptions=False)


def spans():
    return sorted(span.name for span in exporter.get_finished_spans())


def test_a_without_the_plugin(traced_client):
    traced_client.post("/order")
    seen["without"] = spans()


def test_b_with_the_plugin(traced_client, background_tasks):
    traced_client.post("/order")
    assert background_tasks.failed("charge_card")
    seen["with"] = spans()


def test_c_the_same_spans():
    assert seen["with"] == seen["without"]
    assert not [name for name in seen["with"] if name.startswith("BackgroundTask ")]
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry  # the plugin's own is gone


@pytest.fixture
def instrumented_by_the_app():
    otel_bgtasks.instrument(tracer_provider=provider)  # after the fixture's: replaces it, silently
    exporter.clear()
    yield
    otel_bgtasks.uninstrument()


def test_d_an_app_that_instruments_itself(background_tasks, instrumented_by_the_app, caplog):
    client.post("/signup", params={"address": "a@example.com"})
    assert background_tasks.succeeded("send_welcome_email")
    assert spans() == ["BackgroundTask send_welcome_email"]  # its provider, its options
    assert "instrumented already" not in caplog.text


def test_e_instrumented_before_the_test(background_tasks):
    otel_bgtasks.instrument(tracer_provider=provider)


def test_f_left_as_the_app_left_it():
    assert BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry  # the plugin did not undo the app's
    otel_bgtasks.uninstrument()
"""


def test_the_app_keeps_its_own_spans_and_instrumentation(suite: pytest.Pytester) -> None:
    write_tests(suite, SPANS)
    suite.runpytest_inprocess().assert_outcomes(passed=6)


def test_inactive_by_default_and_cheap_to_load(pytester: pytest.Pytester) -> None:
    """A fresh process, as a user's run: the entry point loads the plugin, which imports nothing and patches nothing."""
    pytester.makeini(INI)
    pytester.makepyfile(app=APP)
    pytester.makepyfile(
        test_a_imports="""
            import sys

            LOADED = set(sys.modules)  # collected first: what pytest and its plugins imported


            def test_the_plugin_is_loaded_and_imported_nothing():
                assert "otel_bgtasks.pytest_plugin" in LOADED
                heavy = sorted(
                    name for name in LOADED
                    if name.startswith(("opentelemetry", "wrapt", "starlette", "otel_bgtasks.instrumentor"))
                    or name == "otel_bgtasks.testing"
                )
                assert heavy == []
        """,
        test_b_routes=textwrap.dedent(HEADER)
        + textwrap.dedent(
            """
            import gc

            from otel_bgtasks import BackgroundTasksInstrumentor


            @pytest.mark.parametrize("path", ["/order", "/forgotten", "/report", "/poll"])
            def test_route(path):
                assert client.post(path).status_code == 200
                gc.collect()
                assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
            """
        ),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert "otel_bgtasks: strict" not in result.stdout.str()  # no header: nothing was asked of it


def test_options_marker_and_fixture_are_registered(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    assert [ep.value for ep in entry_points(group="pytest11") if ep.name == "otel_bgtasks"] == [
        "otel_bgtasks.pytest_plugin"
    ]
    help_text = pytester.runpytest_inprocess("--help").stdout.str()
    assert "--bgtasks-strict" in help_text
    assert "bgtasks_strict (bool)" in help_text and "bgtasks_blocking_threshold" in help_text
    pytester.runpytest_inprocess("--markers").stdout.fnmatch_lines(["@pytest.mark.bgtasks_strict(on=True): fail this*"])
    pytester.runpytest_inprocess("--fixtures").stdout.fnmatch_lines(["background_tasks*", "*Every background task*"])


# -- The parts the plugin stands on ---------------------------------------------------------------------


def test_recorder_outside_pytest() -> None:
    """``with TaskRecorder()``: the same records for unittest or a script; the stand-in goes with it."""
    from starlette.background import BackgroundTask

    async def send() -> None:
        pass

    with TaskRecorder() as recorder:
        assert otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
        tasks = BackgroundTasks()
        tasks.add_task(send)
        del tasks
        BackgroundTask(send())  # type: ignore[arg-type]  # the mistake
    assert not otel_bgtasks.BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    assert [r.outcome for r in recorder.records] == ["dropped", "invalid"]
    assert all(r.name.endswith("send") for r in recorder.records)


async def test_fastapi_tasks_skipped_without_sdk_are_skipped_not_dropped() -> None:
    """No SDK, FastAPI >= 0.163: FastAPI's own loop runs the tasks, and the tasks a failure left unrun are told."""
    otel_bgtasks.instrument(tracer_provider=NoOpTracerProvider())
    app = FastAPI()

    def fail() -> None:
        raise ValueError("no")

    def after() -> None:
        pass

    @app.post("/")
    async def route(background_tasks: BackgroundTasks) -> None:
        background_tasks.add_task(fail)
        background_tasks.add_task(after)

    with TaskRecorder() as recorder:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/")
        gc.collect()
    assert [(r.name.rpartition(".")[2], r.outcome) for r in recorder.records] == [
        ("after", "skipped"),
        ("fail", "error"),
    ]
    assert recorder.records[1].left_unrun == (f"{__name__}.{after.__qualname__}",)


@pytest.fixture(autouse=True)
def _no_recorder_left() -> Iterator[None]:
    yield
    gc.collect()  # the inner sessions' cycles, while this module's filter of their "never awaited" applies
    from otel_bgtasks import listeners

    assert not [x for x in listeners.active if isinstance(x, TaskRecorder)]
