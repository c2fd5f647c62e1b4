"""Opt-in argument capture: off by default, bounded, secrets redacted by name wherever they sit."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import attrs
import pytest
from _tasks import app_queueing, each_decorator, request
from conftest import task_spans
from fastapi import BackgroundTasks, FastAPI, Request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel
from starlette.background import BackgroundTask

import otel_bgtasks
from otel_bgtasks.arguments import ArgumentCapture


def login(user: str, password: str, *, options: dict[str, Any] | None = None, **extra: Any) -> None:
    pass


async def test_arguments_are_not_recorded_by_default(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await BackgroundTask(login, "ada", "s3cret")()
    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert "background_task.args" not in span.attributes
    assert "s3cret" not in repr(dict(span.attributes)) and "ada" not in repr(dict(span.attributes))


async def test_captured_arguments_are_redacted_and_truncated(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(
        tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=24, redact_keys=["pin"]
    )
    await BackgroundTask(
        login,
        "ada",
        "s3cret",  # positional, but bound to the parameter "password"
        options={"Api-Key": "k-123", "nested": [{"session_id": "abc"}], "colour": "blue"},
        pin="0000",
        note="x" * 100,
    )()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == ("'ada'", "[redacted]")
    kwargs = span.attributes["background_task.kwargs"]
    assert isinstance(kwargs, tuple)
    options, pin, note = kwargs
    assert "k-123" not in options and "abc" not in options
    assert options.startswith("options={'Api-Key': '[redacted]")
    assert pin == "pin=[redacted]"
    assert note.startswith("note='xxxx") and len(note.removeprefix("note=")) <= 24
    assert "s3cret" not in repr(dict(span.attributes))


# -- what a task is: the parameter names used for redaction come from the callable actually queued ----------


def args_by_span_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {s.name: (s.attributes or {}).get("background_task.args") for s in task_spans(exporter)}


@each_decorator
async def test_a_decorated_task_redacts_its_own_parameters_whichever_was_seen_first(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, decorate: Callable[..., Any]
) -> None:
    @decorate
    def notify(user: str, text: str) -> None:
        pass

    @decorate
    def create_account(user: str, password: str) -> None:
        pass

    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    await request(app_queueing(lambda: [(notify, ("ann", "hello")), (create_account, ("ann", "s3cret"))]))

    args = args_by_span_name(exporter)
    assert args[f"BackgroundTask {notify.__qualname__}"] == ("'ann'", "'hello'")
    assert args[f"BackgroundTask {create_account.__qualname__}"] == ("'ann'", "[redacted]")


class Accounts:
    def create(self, user: str, password: str) -> None:
        pass


async def test_a_method_redacts_the_same_parameter_used_bound_or_unbound(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    accounts = Accounts()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    tasks = [
        (Accounts.create, (accounts, "ann", "s3cret")),
        (accounts.create, ("bob", "hunter2")),
        (functools.partial(accounts.create, "cy"), ("pa55",)),
    ]
    await request(app_queueing(lambda: tasks))

    rendered = [(s.attributes or {}).get("background_task.args") for s in task_spans(exporter)]
    assert [args[-1] for args in rendered] == ["[redacted]"] * 3  # type: ignore[index]
    assert rendered[1] == ("'bob'", "[redacted]")


# -- inside the values: objects, pairs, default names -------------------------------------------------------


class UserCreate(BaseModel):  # FastAPI's own example of a request body
    username: str
    password: str


@dataclasses.dataclass
class Login:
    user: str
    pwd: str
    remember: bool = dataclasses.field(default=False, repr=False)


class Credentials(NamedTuple):
    user: str
    api_key: str


@attrs.define
class Upstream:
    url: str
    auth_header: str


def sign_up(user: UserCreate, login: Login, creds: Credentials, upstream: Upstream, headers: Any) -> None:
    pass


def call_service(**options: Any) -> None:
    pass


async def test_secrets_inside_objects_and_header_pairs_are_redacted(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = FastAPI()

    @app.post("/users")
    async def create_user(user: UserCreate, request: Request, background_tasks: BackgroundTasks) -> dict[str, str]:
        login = Login(user.username, "pw-1")
        credentials = Credentials(user.username, "key-2")
        upstream = Upstream("http://127.0.0.1", "Basic key-3")
        background_tasks.add_task(sign_up, user, login, credentials, upstream, request.headers.raw)
        background_tasks.add_task(call_service, pwd="pw-4", bearer="key-5", auth_header="key-6", user_agent="x")
        return {"username": user.username}

    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=1000)
    await request(
        app, "POST", "/users", json={"username": "ann", "password": "pw-0"}, headers={"Authorization": "Bearer key-7"}
    )

    sign_up_span, call_service_span = task_spans(exporter)
    assert sign_up_span.attributes is not None and call_service_span.attributes is not None
    user, login, credentials, upstream, headers = sign_up_span.attributes["background_task.args"]  # type: ignore[misc]
    assert user == "UserCreate(username='ann', password='[redacted]')"
    assert login == "Login(user='ann', pwd='[redacted]')"
    assert credentials == "Credentials(user='ann', api_key='[redacted]')"
    assert upstream == "Upstream(url='http://127.0.0.1', auth_header='[redacted]')"
    assert "(b'authorization', '[redacted]')" in headers and "(b'host', b'test')" in headers
    assert call_service_span.attributes["background_task.kwargs"] == (
        "pwd=[redacted]",
        "bearer=[redacted]",
        "auth_header=[redacted]",
        "user_agent='x'",
    )
    everything = repr([dict(s.attributes or {}) for s in exporter.get_finished_spans()])
    assert "pw-" not in everything and "key-" not in everything, everything


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("a __repr__ that needs a database connection")


class LazyRecord(Mapping[str, Any]):
    """A mapping backed by a database session that is closed by the time the task runs."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("session is closed")

    def __len__(self) -> int:
        return 1


def process(item: Any, *, note: Any = None) -> None:
    pass


async def test_an_argument_that_cannot_be_rendered_becomes_a_placeholder(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    tasks = [(process, (Unrepresentable(),)), (process, (1,)), (process, ([1, LazyRecord()],))]
    await request(app_queueing(lambda: tasks))

    spans = task_spans(exporter)
    assert [(s.attributes or {}).get("background_task.outcome") for s in spans] == ["success"] * 3
    assert [(s.attributes or {}).get("background_task.args") for s in spans] == [
        ("<unrepresentable Unrepresentable>",),
        ("1",),
        ("[1, <unrepresentable LazyRecord>]",),
    ]


# -- rendering work is bounded by what is shown --------------------------------------------------------------


class Item:
    """Counts how often it is rendered."""

    reprs = 0

    def __repr__(self) -> str:
        Item.reprs += 1
        return "item"


class CountingList(list[Any]):
    """A list that counts the items taken from it."""

    taken = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            CountingList.taken += 1
            yield item


class CountingMapping(Mapping[str, Any]):
    """A large mapping that counts the keys and values taken from it."""

    taken = 0

    def __init__(self, size: int) -> None:
        self._size = size

    def __getitem__(self, key: str) -> Any:
        CountingMapping.taken += 1
        return Item()

    def __iter__(self) -> Iterator[str]:
        for index in range(self._size):
            CountingMapping.taken += 1
            yield f"key{index}"

    def __len__(self) -> int:
        return self._size


@pytest.fixture
def counts() -> Iterator[None]:
    Item.reprs = CountingList.taken = CountingMapping.taken = 0
    yield


@pytest.mark.usefixtures("counts")
def test_a_huge_list_is_walked_only_as_far_as_it_is_shown() -> None:
    item = Item()
    huge = CountingList([item] * 1_000_000)
    nested = [CountingList([item] * 1000)] * 1000

    (shown_huge, shown_nested), _ = ArgumentCapture(max_length=64).render(process, (huge, nested), {})

    assert shown_huge.startswith("CountingList([item, item, ") and shown_huge.endswith("…")
    assert shown_nested.startswith("[CountingList([item, ") and len(shown_nested) == 64
    assert CountingList.taken <= 2 * 64 and Item.reprs <= 2 * 64  # not a million


@pytest.mark.usefixtures("counts")
def test_a_huge_mapping_is_walked_only_as_far_as_it_is_shown() -> None:
    _, (shown,) = ArgumentCapture(max_length=64).render(process, (), {"note": CountingMapping(1_000_000)})

    assert shown.startswith("note=CountingMapping({'key0': item, 'key1': item") and shown.endswith("…")
    assert CountingMapping.taken <= 2 * 64 and Item.reprs <= 64
