# One image, two services: `--target dispatcher` and `--target worker`.
# Agents are mounted (or copied in a derived image) at /agents.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OPENRTC_AGENTS_DIR=/agents
WORKDIR /app
COPY pyproject.toml README.md ./
COPY openrtc ./openrtc
RUN pip install --no-cache-dir . && useradd --system --uid 10001 openrtc
COPY examples/offline_agents /agents
USER openrtc

FROM base AS dispatcher
# SIGTERM drains: stop accepting, flush to Redis, unregister.
STOPSIGNAL SIGTERM
ENTRYPOINT ["openrtc", "dispatcher"]

FROM base AS worker
# SIGTERM drains: running calls finish (up to --drain-timeout), the rest are
# taken over by other workers. Give Kubernetes a grace period above that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["openrtc", "worker"]
