"""A real uvicorn server in a thread, and small helpers for the tests that serve over real sockets.

An ephemeral port on 127.0.0.1, startup and shutdown signalled with events, the server thread joined
before the test asserts anything.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette

WAIT_SECONDS = 20


class _Server(uvicorn.Server):
    """A uvicorn server that says when its startup is over, whether it succeeded or not."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_over = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.startup_over.set()


class Serving:
    """A running server: its base URL, the uvicorn ``Server`` itself, and a way to stop it."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str) -> None:
        self.server = server
        self.thread = thread
        self.url = url

    def stop(self) -> None:
        """Ask uvicorn to exit, as on SIGTERM (graceful shutdown), and join its thread."""
        self.server.should_exit = True
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextmanager
def serving(app: Any, **config: Any) -> Iterator[Serving]:
    """Serve ``app`` on 127.0.0.1 in a thread; on exit ask uvicorn to stop gracefully and join its thread.

    ``config`` goes to ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown``). Every task uvicorn runs
    has finished (or was cancelled at the graceful-shutdown deadline) once the context exits.
    """
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "ws": "none", "lifespan": "on"}
    if taken_for_a_factory(app):  # what users of sentry-sdk 2.0.0 must do: give uvicorn a function
        app = _as_function(app)
    server = _Server(uvicorn.Config(app, **{**options, **config}))

    def run() -> None:
        try:
            server.run()
        finally:
            server.startup_over.set()

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    handle = Serving(server, thread, "")
    try:
        assert server.startup_over.wait(WAIT_SECONDS), "uvicorn did not start"
        assert server.started, "uvicorn failed to start"
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        handle.url = f"http://{host}:{port}"
        yield handle
    finally:
        handle.stop()  # a no-op when the test stopped it already


def taken_for_a_factory(app: Any) -> bool:
    """Whether uvicorn takes ``app``, a plain Starlette app, for a factory: sentry-sdk 2.0.0's own defect.

    Its Starlette integration replaces ``Starlette.__call__`` with a function of ``*args, **kwargs``
    (getsentry/sentry-python#3021, fixed in 2.0.1). uvicorn's factory detection calls the app with no
    arguments and expects a ``TypeError``; it gets a coroutine, serves that, and answers every request 500,
    with or without otel_bgtasks (tests/test_sentry_dedupe.py shows both), for the rest of the process:
    Sentry patches once. FastAPI's own ``__call__`` is untouched.
    """
    if not isinstance(app, Starlette):
        return False
    code = getattr(type(app).__call__, "__code__", None)
    return (
        isinstance(code, types.CodeType)
        and bool(code.co_flags & inspect.CO_VARARGS)
        and "sentry_sdk" in code.co_filename
    )


def _as_function(app: Any) -> Any:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    return asgi


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SilentEndpoint:
    """A hung collector on 127.0.0.1: it accepts every connection and never answers.

    A client waits on it for its whole timeout, where a closed port would refuse it at once. ``hang_up()``
    closes every connection and the listening socket, so a client still waiting fails at once.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # how often the accepting thread looks whether to stop
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-endpoint", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._connections.append(connection)
            self.accepted += 1

    def hang_up(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_SECONDS)
        self._listener.close()
        for connection in self._connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self._connections.clear()


@contextmanager
def silent_endpoint() -> Iterator[SilentEndpoint]:
    """A :class:`SilentEndpoint` until the context exits, when it hangs up."""
    endpoint = SilentEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.hang_up()


class Records(logging.Handler):
    """Keeps every record a logger sees, whatever pytest's or uvicorn's logging setup."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)


@contextmanager
def recording(name: str, level: int = logging.DEBUG) -> Iterator[Records]:
    """Record what logger ``name`` emits at ``level`` and above while the context is open."""
    logger = logging.getLogger(name)
    handler = Records()
    saved = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


@contextmanager
def records_not_retained(name: str) -> Iterator[None]:
    """Keep pytest's log capture from holding on to the records of logger ``name``.

    A record with ``exc_info`` keeps the exception, and its traceback's frames every object they refer
    to; pytest keeps every record until the test ends, a production handler formats it and lets it go.
    """
    logger = logging.getLogger(name)
    handler = logging.NullHandler()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


class Countdown:
    """A thread-safe count of finished tasks that sets ``done`` at zero."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._lock = threading.Lock()
        self.done = threading.Event()

    def tick(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self.done.set()


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)


async def get_many(url: str, paths: Sequence[str], connections: int) -> list[tuple[int, bytes]]:
    """GET every path over ``connections`` keep-alive HTTP/1.1 connections: (status, body) in ``paths`` order.

    A deliberately small client for load tests: httpx costs about 4 ms of CPU per request on a loaded
    2-core machine, more than the server it is meant to load. Bodies must come with a Content-Length.
    """
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    results: list[tuple[int, bytes] | None] = [None] * len(paths)
    queue = iter(enumerate(paths))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index, path in queue:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = _CONTENT_LENGTH.search(head)
                assert length is not None, head
                results[index] = (int(head.split(b" ", 2)[1]), await reader.readexactly(int(length.group(1))))
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.wait_for(asyncio.gather(*(connection() for _ in range(connections))), WAIT_SECONDS * 3)
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]
