"""The library versions this instrumentation supports, read by ``opentelemetry-instrument``."""

_instruments = ("starlette >= 0.27",)
