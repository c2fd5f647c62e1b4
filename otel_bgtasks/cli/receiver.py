"""An OTLP/HTTP trace endpoint on 127.0.0.1, for ``otel-bgtasks watch``: spans in, ``ReadableSpan`` out.

The watched command's SDK exports its spans here (``http/protobuf``, as ``OTLPSpanExporter`` sends
them). Each export request is decoded into the SDK's ``ReadableSpan``, the type the trees are drawn
from, and, with a forward endpoint, sent on unchanged to a real collector.
"""

from __future__ import annotations

import gzip
import queue
import sys
import threading
import zlib
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import cast

from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_bgtasks.cli import demo_extra

with demo_extra():
    import httpx
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.util.types import AttributeValue

TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
# OTLP's span kinds are the API's plus one, UNSPECIFIED (0) first.
_KINDS = {0: SpanKind.INTERNAL, **{kind.value + 1: kind for kind in SpanKind}}


def traces_url(endpoint: str) -> str:
    """The traces URL of a collector given by its base URL (as in OTEL_EXPORTER_OTLP_ENDPOINT) or by that URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class SpanReceiver:
    """Serves OTLP/HTTP on 127.0.0.1 (an ephemeral port) in a thread; :meth:`get` returns what arrived.

    Binds at once, so that the URL is known before the command starts; serves from :meth:`start` on.
    """

    def __init__(self, forward_to: str | None = None) -> None:
        self._batches: queue.Queue[list[ReadableSpan]] = queue.Queue()
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.traces_url = f"http://{host!s}:{port}{TRACES_PATH}"
        self.forwarder = None if forward_to is None else Forwarder(traces_url(forward_to))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="otel-bgtasks-watch-receiver", daemon=True
        )

    def start(self) -> None:
        """Start serving (and forwarding)."""
        self._thread.start()
        if self.forwarder is not None:
            self.forwarder.start()

    def received(self, request: ExportTraceServiceRequest, body: bytes) -> None:
        """One export request, decoded; called by the request handler's thread."""
        self._batches.put(list(spans_from_proto(request)))
        if self.forwarder is not None:
            self.forwarder.send(body)

    def get(self, timeout: float) -> list[ReadableSpan]:
        """The spans of every export request received so far, waiting up to ``timeout`` for one if none."""
        try:
            spans = self._batches.get(timeout=timeout)
        except queue.Empty:
            return []
        return spans + self.drain()

    def drain(self) -> list[ReadableSpan]:
        """The spans received and not yet returned, without waiting."""
        spans: list[ReadableSpan] = []
        while True:
            try:
                spans.extend(self._batches.get_nowait())
            except queue.Empty:
                return spans

    def close(self) -> None:
        """Stop serving; send on what is still to forward."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        if self.forwarder is not None:
            self.forwarder.close()

    def __enter__(self) -> SpanReceiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: SpanReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.receiver = receiver


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter reuses its connection

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TRACES_PATH:
            self._reply(404, b"")
            return
        try:
            body = _decompressed(body, self.headers.get("Content-Encoding", "identity"))
            request = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError, ValueError) as exc:
            self._reply(400, f"not an OTLP/HTTP protobuf trace export: {exc}".encode())
            return
        cast(_Server, self.server).receiver.received(request, body)
        self._reply(200, ExportTraceServiceResponse().SerializeToString())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", _PROTOBUF if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No access log: the terminal is the watched command's."""


def _decompressed(body: bytes, encoding: str) -> bytes:
    """The body as sent with ``OTEL_EXPORTER_OTLP_COMPRESSION`` gzip or deflate, or none."""
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "identity":
        return body
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


# -- OTLP to ReadableSpan --------------------------------------------------------------------------


def spans_from_proto(request: ExportTraceServiceRequest) -> Iterable[ReadableSpan]:
    """The spans of an OTLP export request, as the SDK's spans."""
    for resource_spans in request.resource_spans:
        resource = Resource(_attributes(resource_spans.resource.attributes))
        for scope_spans in resource_spans.scope_spans:
            scope = InstrumentationScope(scope_spans.scope.name, scope_spans.scope.version or None)
            for span in scope_spans.spans:
                yield _span(span, resource, scope)


def _span(span: SpanProto, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    trace_id = int.from_bytes(span.trace_id, "big")
    code = StatusCode(span.status.code)
    return ReadableSpan(
        name=span.name,
        context=SpanContext(trace_id, int.from_bytes(span.span_id, "big"), False, TraceFlags(TraceFlags.SAMPLED)),
        parent=SpanContext(trace_id, int.from_bytes(span.parent_span_id, "big"), False)
        if span.parent_span_id
        else None,
        resource=resource,
        attributes=_attributes(span.attributes),
        events=[Event(event.name, _attributes(event.attributes), event.time_unix_nano) for event in span.events],
        links=[
            Link(
                SpanContext(int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big"), False),
                _attributes(link.attributes),
            )
            for link in span.links
        ],
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        # The SDK logs a warning for a description without ERROR.
        status=Status(code, span.status.message or None) if code is StatusCode.ERROR else Status(code),
        start_time=span.start_time_unix_nano,
        end_time=span.end_time_unix_nano,
        instrumentation_scope=scope,
    )


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {}
    for pair in pairs:
        value = _value(pair.value)
        if value is not None:
            attributes[pair.key] = value
    return attributes


def _value(value: AnyValue) -> AttributeValue | None:
    """An attribute's value; ``None`` for what an SDK attribute cannot hold (maps, bytes, mixed arrays)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "array_value":
        items = [_value(item) for item in value.array_value.values]
        if all(isinstance(item, str) for item in items):
            return [item for item in items if isinstance(item, str)]
        if all(isinstance(item, bool) for item in items):
            return [item for item in items if isinstance(item, bool)]
        if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            return [item for item in items if isinstance(item, int)]
        if all(isinstance(item, float) for item in items):
            return [item for item in items if isinstance(item, float)]
    return None


# -- Sending on ------------------------------------------------------------------------------------


class Forwarder:
    """Sends each export request on to a collector as received, from a thread of its own.

    A slow or absent collector must not hold up the watched app's exporter, which waits for our reply.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0
        self._bodies: queue.Queue[bytes | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="otel-bgtasks-watch-forwarder", daemon=True)

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

    def send(self, body: bytes) -> None:
        """Queue one export request's protobuf body."""
        self._bodies.put(body)

    def close(self, timeout: float = 10) -> None:
        """Send what is queued, then stop (waiting ``timeout`` at the most)."""
        if self._thread.is_alive():
            self._bodies.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while (body := self._bodies.get()) is not None:
                try:
                    client.post(self.url, content=body, headers={"Content-Type": _PROTOBUF}).raise_for_status()
                except httpx.HTTPError as exc:
                    self.failed += 1
                    if self.failed == 1:  # once: the summary at the end counts them
                        print(f"otel-bgtasks watch: could not send spans on to {self.url}: {exc}", file=sys.stderr)
                else:
                    self.sent += 1
