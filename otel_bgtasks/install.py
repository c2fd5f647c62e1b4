"""The install line for an extra, in both forms: the released package's, and a clone of the repository's.

Until otel_bgtasks is on the package index, ``pip install 'otel_bgtasks[...]'`` fails in a fresh virtual
environment ("No matching distribution found"); from a clone, ``pip install -e '.[...]'`` works. Every
message that names an install shows both, labelled, so that the one that works where the reader is is there.
"""

from __future__ import annotations


def pip_install(extras: str) -> str:
    """``pip install`` lines for otel_bgtasks with ``extras`` (``"demo"``, ``"sentry,demo"``), both forms."""
    return f"pip install 'otel_bgtasks[{extras}]' (released package) or pip install -e '.[{extras}]' (from a clone)"


NO_STARLETTE = (
    "otel_bgtasks traces Starlette's background tasks (FastAPI's too), and Starlette is not installed. Install "
    "your framework (pip install fastapi, or pip install starlette), or otel_bgtasks with the Starlette releases "
    f"it supports: {pip_install('instruments')}."
)
