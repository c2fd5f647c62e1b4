"""The ``otel-bgtasks`` command line: see your background tasks' spans in the terminal.

Usage (needs the ``demo`` extra: ``pip install 'otel_bgtasks[demo]'`` for the released package,
``pip install -e '.[demo]'`` from a clone of the repository)::

    otel-bgtasks demo                 # or: otel-bgtasks, or: python -m otel_bgtasks.cli demo
    otel-bgtasks demo --otlp-endpoint http://localhost:4318   # send the spans to a collector instead
    otel-bgtasks watch -- uvicorn myapp:app --reload          # your own app, one tree per request
    otel-bgtasks watch --otlp-endpoint http://localhost:4318 -- uvicorn myapp:app   # and send them on
    otel-bgtasks --version

Modules:

- :mod:`~otel_bgtasks.cli.demo`: ``otel-bgtasks demo`` serves the demo app on 127.0.0.1, calls
  each route once and prints every request's trace as a tree.
- :mod:`~otel_bgtasks.cli.demo_app`: the demo's routes and tasks, one per situation worth seeing.
- :mod:`~otel_bgtasks.cli.watch`: ``otel-bgtasks watch`` runs a command traced and prints its trees.
- :mod:`~otel_bgtasks.cli.receiver`: the OTLP/HTTP endpoint on 127.0.0.1 that ``watch`` gets the spans from.
- :mod:`~otel_bgtasks.cli.trees`: spans to rich trees, one per request.

Importing this package imports nothing optional; the commands' modules raise :class:`MissingExtraError`,
with the install command, when the ``demo`` extra is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator, Sequence
from contextlib import contextmanager

from otel_bgtasks.install import pip_install
from otel_bgtasks.version import __version__

INSTALL_DEMO_EXTRA = pip_install("demo")


class MissingExtraError(ImportError):
    """A module of the ``demo`` extra is not installed."""


@contextmanager
def demo_extra() -> Generator[None]:
    """Around the imports of the ``demo`` extra: a missing one raises :class:`MissingExtraError` naming the fix."""
    try:
        yield
    except ImportError as exc:
        raise MissingExtraError(
            f"otel-bgtasks needs the demo extra ({exc.name or exc} is missing): {INSTALL_DEMO_EXTRA}", name=exc.name
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otel-bgtasks`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="otel-bgtasks", description="Tools for otel_bgtasks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(command="demo", otlp_endpoint=None)
    commands = parser.add_subparsers(title="commands", dest="command")
    demo = commands.add_parser(
        "demo",
        help="serve a demo app, call each route and show the background-task spans (the default command)",
        description="Serve otel_bgtasks' demo app on 127.0.0.1, call each route once, and print each "
        "request's trace as a tree: which tasks ran, failed or were skipped, and why.",
    )
    demo.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send the spans over OTLP/HTTP to this collector (e.g. http://localhost:4318) instead of printing them",
    )
    watch = commands.add_parser(
        "watch",
        help="run your app's command traced and print each request's trace as a tree",
        description="Run COMMAND (say, uvicorn myapp:app --reload) with the OpenTelemetry SDK set up as "
        "opentelemetry-instrument does, and print each request's trace as a tree, with its background tasks, "
        "among the command's own output. Ctrl-C stops it; its exit status is ours.",
    )
    watch.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="also send the spans on over OTLP/HTTP to this collector (e.g. http://localhost:4318)",
    )
    watch.add_argument("argv", metavar="COMMAND", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    if args.command == "watch":
        command: list[str] = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            watch.error("say which command to run, e.g. otel-bgtasks watch -- uvicorn myapp:app --reload")
        try:
            from otel_bgtasks.cli.watch import run_watch
        except MissingExtraError as exc:
            print(exc, file=sys.stderr)
            return 2
        return run_watch(command, otlp_endpoint=args.otlp_endpoint)
    try:
        from otel_bgtasks.cli.demo import run_demo
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 2
    return run_demo(otlp_endpoint=args.otlp_endpoint)
