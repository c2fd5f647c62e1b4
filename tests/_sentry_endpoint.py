"""Sentry's ingestion endpoint on 127.0.0.1, as far as the real sentry-sdk's HTTP transport can tell.

One endpoint for every Sentry test: the ``receiver`` fixture (conftest.py) for a test of its own, the class
for a module-wide one (test_invisible.py).
"""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration


class SentryEndpoint:
    """Keeps the error events the SDK posts, in order, as parsed JSON."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        events = self.events

        class Envelopes(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                items = data.split(b"\n")[1:]  # after the envelope's header: item header, item, ...
                for item_header, item in zip(items[::2], items[1::2], strict=False):
                    if json.loads(item_header).get("type") == "event":
                        events.append(json.loads(item))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Envelopes)
        self.thread = threading.Thread(target=self.server.serve_forever, name="sentry-endpoint", daemon=True)
        self.thread.start()
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def init_sentry(dsn: str, *, framework_integrations: bool, **options: Any) -> None:
    """The SDK posting to ``dsn``, with or without its Starlette and FastAPI integrations, nothing auto-enabled."""
    integrations = [StarletteIntegration(), FastApiIntegration()] if framework_integrations else []
    sentry_sdk.init(dsn=dsn, integrations=integrations, auto_enabling_integrations=False, **options)
