"""Opt-in argument capture: off by default, bounded, secrets redacted by name wherever they sit."""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import attrs
import pytest
from _tasks import app_queueing, each_wrapping_decorator, log_calls_without_wraps, request
from conftest import task_spans
from fastapi import BackgroundTasks, FastAPI, Request
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel, Field, SecretStr
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

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


def pay(user: str, ssn: str, **details: Any) -> None:
    pass


@pytest.mark.parametrize("variable", ["ssn,iban", " SSN , iban ,", "iban,ssn"])
async def test_redact_keys_from_the_environment_are_comma_separated(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_BGTASKS_REDACT_KEYS", variable)
    monkeypatch.setenv("OTEL_PYTHON_BGTASKS_CAPTURE_ARGS", "true")
    otel_bgtasks.instrument(tracer_provider=tracer_provider)
    await BackgroundTask(pay, "ann", "078-05-1120", iban="DE89370400440532013000", payee_iban="FR14", amount=12)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == ("'ann'", "[redacted]")
    assert span.attributes["background_task.kwargs"] == ("iban=[redacted]", "payee_iban=[redacted]", "amount=12")


# -- what a task is: the parameter names used for redaction come from the callable actually queued ----------


def args_by_span_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {s.name: (s.attributes or {}).get("background_task.args") for s in task_spans(exporter)}


@each_wrapping_decorator
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


def send_newsletter(*recipients: str) -> None:
    pass


async def test_values_whose_parameter_name_is_unknown_are_shown_by_type_only(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Without functools.wraps the wrapper's (*args, **kwargs) is all that can be seen: "s3cret" binds to *args,
    # not to "password". Keywords keep their names, and a value given by keyword is redacted by it as before.
    @log_calls_without_wraps
    def create_account(user: str, password: str) -> None:
        pass

    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    await BackgroundTask(create_account, "ann", "s3cret")()
    await BackgroundTask(create_account, user="ann", password="s3cret")()
    await BackgroundTask(send_newsletter, "ann@example.com", "bob@example.com")()
    await BackgroundTask(print, "printed by a background task")()  # no signature: no name either

    spans = task_spans(exporter)
    assert [(s.attributes or {}).get("background_task.args") for s in spans] == [
        ("[redacted str]", "[redacted str]"),
        (),
        ("[redacted str]", "[redacted str]"),
        ("[redacted str]",),
    ]
    assert [(s.attributes or {}).get("background_task.kwargs") for s in spans] == [
        (),
        ("user='ann'", "password=[redacted]"),
        (),
        (),
    ]
    # Named after the function the wrapper closes over, not the wrapper every function it decorates shares.
    assert spans[0].name == (
        "BackgroundTask test_values_whose_parameter_name_is_unknown_are_shown_by_type_only.<locals>.create_account"
    )
    for span in spans:
        assert "s3cret" not in repr(dict(span.attributes or {}))


class Accounts:
    def create(self, user: str, password: str) -> None:
        pass


async def test_a_partials_own_arguments_are_captured_and_redacted_by_the_function_they_go_to(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    accounts = Accounts()
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True)
    tasks: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
        (functools.partial(login, "ada", "s3cret"), (), {}),
        (functools.partial(login, "ada", password="s3cret", options={"colour": "blue"}), (), {"options": None}),
        (functools.partial(functools.partial(accounts.create, "cy"), "pa55"), (), {}),
    ]
    for func, args, kwargs in tasks:
        await BackgroundTask(func, *args, **kwargs)()
    # "user" is given by keyword, so the positional "s3cret" has no parameter to go to (the call fails).
    with pytest.raises(TypeError, match="multiple values for argument 'user'"):
        await BackgroundTask(functools.partial(login, user="ann"), "s3cret")()

    spans = task_spans(exporter)
    assert [(s.attributes or {}).get("background_task.args") for s in spans] == [
        ("'ada'", "[redacted]"),
        ("'ada'",),
        ("'cy'", "[redacted]"),
        ("[redacted str]",),
    ]
    assert [(s.attributes or {}).get("background_task.kwargs") for s in spans] == [
        (),
        ("password=[redacted]", "options=None"),  # the call's keyword wins over the partial's, as in the call
        (),
        ("user='ann'",),
    ]
    assert [(s.attributes or {}).get("background_task.outcome") for s in spans] == ["success"] * 3 + ["error"]


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


def compare(left: Any, right: Any) -> None:
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


def test_values_nested_deeper_than_four_levels_show_as_dots() -> None:
    capture = ArgumentCapture(max_length=1000)
    four_levels = [[[{"password": 1, "level": 4}]]]
    (shown,), _ = capture.render(process, (four_levels,), {})
    assert shown == "[[[{'password': '[redacted]', 'level': 4}]]]"
    (shown,), _ = capture.render(process, ([four_levels],), {})
    assert shown == "[[[[{...}]]]]"


class UnreadableKey:
    def __str__(self) -> str:
        raise RuntimeError("a name that cannot be read")

    def __repr__(self) -> str:
        return "UnreadableKey()"


def test_a_key_whose_name_cannot_be_read_counts_as_secret() -> None:
    (shown,), _ = ArgumentCapture(max_length=1000).render(process, ({UnreadableKey(): "s3cret", "n": 1},), {})
    assert shown == "{UnreadableKey(): '[redacted]', 'n': 1}"


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

    (shown_huge, shown_nested), _ = ArgumentCapture(max_length=64).render(compare, (huge, nested), {})

    assert shown_huge.startswith("CountingList([item, item, ") and shown_huge.endswith("…")
    assert shown_nested.startswith("[CountingList([item, ") and len(shown_nested) == 64
    assert CountingList.taken <= 2 * 64 and Item.reprs <= 2 * 64  # not a million


@pytest.mark.usefixtures("counts")
def test_a_huge_mapping_is_walked_only_as_far_as_it_is_shown() -> None:
    _, (shown,) = ArgumentCapture(max_length=64).render(process, (), {"note": CountingMapping(1_000_000)})

    assert shown.startswith("note=CountingMapping({'key0': item, 'key1': item") and shown.endswith("…")
    assert CountingMapping.taken <= 2 * 64 and Item.reprs <= 64


# -- a class's own repr decides what is shown; generated reprs are walked as they would show ------------------

DSN = "postgresql://app:hunter2@db.internal/app"


def masked(dsn: str) -> str:
    return dsn.replace("hunter2", "***")


@dataclasses.dataclass
class DataclassWithRepr:  # repr=True, but @dataclass keeps a __repr__ written in the class body
    dsn: str

    def __repr__(self) -> str:
        return f"DataclassWithRepr({masked(self.dsn)!r})"


@dataclasses.dataclass(repr=False)
class DataclassReprFalse:
    dsn: str

    def __repr__(self) -> str:
        return f"DataclassReprFalse({masked(self.dsn)!r})"


# The recursion guard dataclasses itself puts around the repr it generates: its own on Python 3.10-3.12, reprlib's on
# 3.13. A hand-written repr under it is still hand-written.
RECURSION_GUARD: Any = getattr(dataclasses, "_recursive_repr", None) or reprlib.recursive_repr()


@dataclasses.dataclass
class DataclassGuardedRepr:
    dsn: str

    @RECURSION_GUARD
    def __repr__(self) -> str:
        return f"DataclassGuardedRepr({masked(self.dsn)!r})"


@dataclasses.dataclass
class Settings:
    dsn: str


class SettingsWithRepr(Settings):  # a plain subclass overriding the repr its dataclass base generated
    def __repr__(self) -> str:
        return f"SettingsWithRepr({masked(self.dsn)!r})"


@attrs.define
class AttrsWithRepr:
    dsn: str

    def __repr__(self) -> str:
        return f"AttrsWithRepr({masked(self.dsn)!r})"


class PydanticWithRepr(BaseModel):
    dsn: str

    def __repr__(self) -> str:
        return f"PydanticWithRepr({masked(self.dsn)!r})"


class NamedTupleWithRepr(NamedTuple):
    dsn: str

    def __repr__(self) -> str:
        return f"NamedTupleWithRepr({masked(self.dsn)!r})"


class DictWithRepr(dict[str, str]):
    def __repr__(self) -> str:
        return f"DictWithRepr({ {key: masked(value) for key, value in self.items()}!r})"


class ListWithRepr(list[str]):
    def __repr__(self) -> str:
        return f"ListWithRepr({[masked(value) for value in self]!r})"


class StrWithRepr(str):
    __slots__ = ()

    def __repr__(self) -> str:
        return "StrWithRepr('***')"


OWN_REPRS = [
    DataclassWithRepr(DSN),
    DataclassReprFalse(DSN),
    DataclassGuardedRepr(DSN),
    SettingsWithRepr(DSN),
    AttrsWithRepr(DSN),
    PydanticWithRepr(dsn=DSN),
    NamedTupleWithRepr(DSN),
    DictWithRepr(url=DSN),
    ListWithRepr([DSN]),
    StrWithRepr(DSN),
]


@pytest.mark.parametrize("value", OWN_REPRS, ids=[type(value).__name__ for value in OWN_REPRS])
async def test_a_repr_written_for_the_class_is_what_is_shown(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, value: object
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=1000)
    await BackgroundTask(process, value)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == (repr(value),)
    assert "hunter2" not in repr(dict(span.attributes)) and "***" in repr(value)


@attrs.define
class Endpoint:
    url: str
    fingerprint: str = attrs.field(repr=lambda print_: print_[:2] + "…")  # attrs' per-field repr function
    dsn: str = attrs.field(repr=False, default=DSN)


class Account(BaseModel):
    username: str
    dsn: str = Field(default=DSN, repr=False)
    key: SecretStr


@dataclasses.dataclass
class Job:
    name: str
    dsn: str = dataclasses.field(default=DSN, repr=False)


@dataclasses.dataclass
class NightlyJob(Job):  # a dataclass under a dataclass: its own generated repr, its own fields
    hour: int = 3


class Shown(Job):  # no repr of its own: the repr its dataclass base generated, walked
    pass


async def test_generated_reprs_are_walked_and_what_they_hide_stays_hidden(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=1000)
    values = (
        Endpoint("http://127.0.0.1", "fp-42"),
        Account(username="ann", key=SecretStr("hunter2")),
        NightlyJob("backup"),
        Shown("vacuum"),
        UserCreate(username="ann", password="hunter2"),
    )
    await BackgroundTask(process, values)()

    (span,) = task_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["background_task.args"] == (
        "(Endpoint(url='http://127.0.0.1', fingerprint=fp…), Account(username='ann', key=SecretStr('**********')), "
        "NightlyJob(name='backup', hour=3), Shown(name='vacuum'), UserCreate(username='ann', password='[redacted]'))",
    )
    assert repr(values[0]) == "Endpoint(url='http://127.0.0.1', fingerprint=fp…)"  # the same fields as attrs shows


async def test_a_request_is_described_not_walked(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def route(item_id: int, request: Request, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(process, request, note={"request": request})
        # Starlette's containers print every item in their own reprs: walked instead, so that keys redact.
        background_tasks.add_task(process, request.headers, note=request.query_params)
        return {"item_id": item_id}

    otel_bgtasks.instrument(tracer_provider=tracer_provider, capture_args=True, capture_args_max_length=10_000)
    await request(app, "GET", "/items/7?token=tk-42&page=2", headers={"X-Upstream": "up-43", "X-Auth-Key": "key-44"})

    described, walked = task_spans(exporter)
    assert described.attributes is not None and walked.attributes is not None
    assert described.attributes["background_task.args"] == ("<Request GET /items/7>",)
    assert described.attributes["background_task.kwargs"] == ("note={'request': <Request GET /items/7>}",)
    (headers,) = walked.attributes["background_task.args"]  # type: ignore[misc]
    assert headers.startswith("Headers({'host': 'test', ") and "'x-auth-key': '[redacted]'" in headers
    assert walked.attributes["background_task.kwargs"] == ("note=QueryParams({'token': '[redacted]', 'page': '2'})",)
    assert "key-44" not in headers and "tk-42" not in repr(walked.attributes)


def test_a_websocket_and_a_bare_connection_are_described() -> None:
    scope = {"type": "websocket", "path": "/ws", "query_string": b"token=tk-42", "headers": []}

    async def receive() -> Any:
        raise AssertionError("never read")

    async def send(message: Any) -> None:
        raise AssertionError("never written")

    shown, _ = ArgumentCapture(max_length=1000).render(process, (WebSocket(scope, receive, send),), {})
    assert shown == ["<WebSocket /ws>"]
    shown, _ = ArgumentCapture(max_length=1000).render(process, (HTTPConnection(scope),), {})
    assert shown == ["<HTTPConnection /ws>"]


# -- a huge string costs what is shown, whatever its class ----------------------------------------------------


class Text(str):
    __slots__ = ()


class Blob(bytes):
    __slots__ = ()


def peak_allocation(render: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        render()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("value", [Text("x" * 50_000_000), Blob(b"x" * 50_000_000)], ids=["str", "bytes"])
def test_a_huge_string_subclass_is_cut_before_it_is_rendered(value: str | bytes) -> None:
    capture = ArgumentCapture(max_length=64)
    args: list[str] = []
    # A repr of the whole string would allocate 50 MB (and take ~100 ms of the event loop).
    assert peak_allocation(lambda: args.extend(capture.render(process, (value,), {})[0])) < 100_000
    assert args == [repr(value[:64])[:63] + "…"]


def test_a_huge_key_is_not_searched_in_full_and_counts_as_secret() -> None:
    capture = ArgumentCapture(max_length=64)
    key = Text("k" * 50_000_000)
    assert peak_allocation(lambda: capture.is_secret(key)) < 100_000
    assert capture.is_secret(key) and capture.is_secret(b"k" * 300) and capture.is_secret("k" * 257)
    assert not capture.is_secret("k" * 256)
