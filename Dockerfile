# The example app (examples/fastapi_app.py) for docker-compose.yml, configured only through OTEL_*
# environment variables: opentelemetry-instrument (opentelemetry-distro) sets up the SDK from them
# before the app is imported, and the app's own otel_bgtasks.instrument(app) uses that global provider.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package first (README.md is its long description), so that editing an example does not reinstall it.
COPY pyproject.toml README.md ./
COPY otel_bgtasks ./otel_bgtasks
# A current pip: the image's pip 24 could not resolve these against the current OpenTelemetry releases.
RUN pip install --upgrade pip && pip install ".[demo]" opentelemetry-distro

COPY examples ./examples

RUN useradd --system --uid 10001 --no-create-home app
USER 10001

EXPOSE 8000
# SIGINT, not SIGTERM: after its graceful shutdown (background tasks included) uvicorn re-raises the signal
# it got. A re-raised SIGTERM kills Python before its exit handlers run (unless it is the container's PID 1,
# which ignores it), so the SDK would never flush its last spans and metrics. A re-raised SIGINT is a
# KeyboardInterrupt: a normal exit, which flushes both, PID 1 or not (`init: true`, other runtimes).
STOPSIGNAL SIGINT
CMD ["opentelemetry-instrument", "uvicorn", "examples.fastapi_app:app", "--host", "0.0.0.0", "--port", "8000"]
