#!/usr/bin/env bash
# Make ./.venv exactly what uv.lock names for this repository's own runs: the
# project (editable) with its hiredis and tracing extras, and the dev group.
# `--locked` resolves nothing and refuses a stale lock; uv removes whatever the
# lock does not list. Extra arguments go to `uv sync` (`--check`: only verify).
set -euo pipefail
cd "$(dirname "$0")/.."
UV="$(bash scripts/uv.sh)"
# hiredis: production installs should have it (README), and the benchmarks measure with it.
# No interpreter downloads: the venv is built on this machine's Python.
UV_PYTHON_DOWNLOADS=never exec "$UV" sync --quiet --locked --python "${PYTHON:-python3}" \
  --extra hiredis --extra tracing "$@"
