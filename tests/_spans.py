"""Spans as tests read them: whole spans as plain data, and numbered requests with their tasks.

``span_as_dict`` turns a finished span into what a user sees of it (name, kind, parent and links by
name, status, attributes, events), so a test about the span contract compares the whole span with its
expected form in one assertion; values that vary from run to run (durations) stand as ``ANY_DURATION``.

For the tests that serve many concurrent requests, ``add_work_route`` tags each request span with
``test.request_id``, the tasks tag their own spans with ``test.task_request_id`` (``tag_task_span``), and
``assert_each_request_keeps_its_tasks`` checks the span tree: every task span sits with the request that
queued it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan


class Matching:
    """Equal to every value ``accepts`` takes: stands, in an expected span, for a value that varies per run."""

    def __init__(self, description: str, accepts: Callable[[Any], bool]) -> None:
        self.description = description
        self.accepts = accepts

    def __eq__(self, other: object) -> bool:
        return self.accepts(other)

    def __hash__(self) -> int:
        return hash(self.description)

    def __repr__(self) -> str:
        return f"<{self.description}>"


ANY_DURATION = Matching("any duration in seconds (a float >= 0)", lambda v: isinstance(v, float) and v >= 0)


def containing(text: str) -> Matching:
    """Any string that contains ``text`` (a stack trace that names a function, say)."""
    return Matching(f"a string containing {text!r}", lambda v: isinstance(v, str) and text in v)


def span_as_dict(span: ReadableSpan, finished: Sequence[ReadableSpan]) -> dict[str, Any]:
    """What a user sees of ``span`` in a trace viewer, as plain data to compare whole with the expected span.

    Its parent and the spans it links to are named; they are looked up among ``finished``, where each must
    be the only span of its name (a test with two same-named spans compares span ids instead).
    """
    names = {s.context.span_id: s.name for s in finished}
    name_counts = Counter(names.values())

    def name_of(span_id: int) -> str:
        name = names.get(span_id, "<not among the finished spans>")
        assert name_counts[name] <= 1, f"two finished spans are named {name!r}: name the spans apart"
        return name

    return {
        "name": span.name,
        "kind": span.kind,
        "parent": None if span.parent is None else name_of(span.parent.span_id),
        "links": [name_of(link.context.span_id) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "attributes": dict(span.attributes or {}),
        "events": [{"name": event.name, "attributes": dict(event.attributes or {})} for event in span.events],
    }


def add_work_route(app: FastAPI, *tasks: Callable[[int], Any]) -> None:
    """``GET /work/{request_id}``: tags its request span and queues each of ``tasks`` with the request id."""

    @app.get("/work/{request_id}")
    async def work(request_id: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        trace.get_current_span().set_attribute("test.request_id", request_id)
        for task in tasks:
            background_tasks.add_task(task, request_id)
        return {"request_id": request_id}


def tag_task_span(request_id: int) -> None:
    """Called from inside a task: marks the current (task) span with the id of the request that queued it."""
    trace.get_current_span().set_attribute("test.task_request_id", request_id)


def assert_each_request_keeps_its_tasks(
    tasks: Sequence[ReadableSpan],
    requests: int,
    task_functions: Iterable[Callable[..., Any]],
    creator_of: Callable[[ReadableSpan], ReadableSpan],
) -> None:
    """Every task span succeeded and sits with the request that queued it: no mix-up between requests.

    Requests are numbered ``0 .. requests - 1``; each request span carries ``test.request_id`` and each
    task span ``test.task_request_id``. ``creator_of(task)`` checks how the task is tied to the span
    that created it (parent or link, trace ids, kind) and returns that span. Each request must have one
    task span per function of ``task_functions``.
    """
    per_request: dict[int, list[str]] = {i: [] for i in range(requests)}
    mix_ups: list[tuple[str, Any, Any]] = []
    for task in tasks:
        assert task.attributes is not None
        assert task.attributes["background_task.outcome"] == "success"
        task_request_id = task.attributes["test.task_request_id"]
        creator = creator_of(task)
        assert creator.attributes is not None
        if creator.attributes["test.request_id"] != task_request_id:
            mix_ups.append((task.name, task_request_id, creator.attributes["test.request_id"]))
        per_request[int(task_request_id)].append(task.name)  # type: ignore[arg-type]
    assert mix_ups == []
    expected = sorted(f"BackgroundTask {f.__qualname__}" for f in task_functions)
    assert all(sorted(names) == expected for names in per_request.values()), per_request
