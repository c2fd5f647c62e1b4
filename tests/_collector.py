"""A stand-in OTLP/HTTP collector on 127.0.0.1: keeps every export request's path and body."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans


class Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, bytes]] = []
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"

    def resource_spans(self) -> list[ResourceSpans]:
        """Every trace export's spans, by resource (an export to any other path fails the test)."""
        found: list[ResourceSpans] = []
        for path, body in self.received:
            assert path == "/v1/traces"
            found.extend(ExportTraceServiceRequest.FromString(body).resource_spans)
        return found

    def span_names(self) -> set[str]:
        return {span.name for spans in self.resource_spans() for scope in spans.scope_spans for span in scope.spans}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cast(Collector, self.server).received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def collector() -> Iterator[Collector]:
    """A collector serving in a thread until the context exits."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
