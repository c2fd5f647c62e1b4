"""The ``sitecustomize`` of the command ``otel-bgtasks watch`` runs: opentelemetry-instrument's, in every process.

``otel-bgtasks watch`` puts this directory first on the command's ``PYTHONPATH``, so every Python process
the command starts imports this module first. It runs opentelemetry-instrument's own ``sitecustomize``
(the SDK set up from the ``OTEL_*`` variables, every installed instrumentation loaded) and leaves this
directory on ``PYTHONPATH`` for the Python processes that process starts, such as uvicorn's ``--reload``
worker: opentelemetry-instrumentation 0.46b0 (the oldest otel_bgtasks supports) takes its own directory
off ``PYTHONPATH`` for good, so that worker would run untraced.
"""

import importlib
import os

_directory = os.path.dirname(os.path.abspath(__file__))
_path = os.environ.get("PYTHONPATH", "")
# Off the path while the SDK and the instrumentations start, as opentelemetry-instrument does: a Python
# process one of them starts must not start them again.
os.environ["PYTHONPATH"] = os.pathsep.join(entry for entry in _path.split(os.pathsep) if entry != _directory)
try:
    importlib.import_module("opentelemetry.instrumentation.auto_instrumentation.sitecustomize")  # the set-up itself
finally:
    os.environ["PYTHONPATH"] = _path
