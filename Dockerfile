# One image, two services: `--target dispatcher` and `--target worker`.
# Agents are mounted (or copied in a derived image) at /agents.

# The venv is built from uv.lock, the versions CI ran: nothing is resolved at
# build time. UV_VERSION is pyproject.toml's [tool.uv] required-version
# (tests/test_packaging.py keeps the two equal).
FROM python:3.11-slim AS build
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# Dependencies first, the project after: a code change reuses this layer.
RUN uv sync --locked --no-dev --extra hiredis --no-install-project --python /usr/local/bin/python3
COPY openrtc ./openrtc
RUN uv sync --locked --no-dev --extra hiredis --no-editable --python /usr/local/bin/python3

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OPENRTC_AGENTS_DIR=/agents \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --create-home --uid 10001 openrtc
WORKDIR /app
COPY examples/offline_agents /agents
USER openrtc
# What the agents' livekit plugins fetch at run time (VAD and turn-detector
# models, ...) is downloaded now, into the image (~openrtc/.cache): a container
# starts without downloads. A derived image that copies its own /agents runs
# this line again after its COPY.
RUN openrtc download-files
# /healthz of the service's HTTP server (port from OPENRTC_HTTP_PORT, set per
# target below: set the variable, not --http-port, so this check follows it).
# 503 = event loop stalled; no answer within the timeout counts as unhealthy too.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; p = os.environ.get('OPENRTC_HTTP_PORT', '0'); sys.exit(0) if p == '0' else urllib.request.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=3)"]

FROM base AS dispatcher
ENV OPENRTC_HTTP_PORT=8181
EXPOSE 8181
# SIGTERM drains: stop accepting, flush to Redis, unregister.
STOPSIGNAL SIGTERM
ENTRYPOINT ["openrtc", "dispatcher"]

FROM base AS worker
ENV OPENRTC_HTTP_PORT=8182
EXPOSE 8182
# SIGTERM drains: running calls finish (up to --drain-timeout), the rest are
# taken over by other workers. Give Kubernetes a grace period above that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["openrtc", "worker"]
