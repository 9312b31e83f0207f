#!/usr/bin/env bash
# The static gate: ruff (lint and format), mypy and the package layering (import-linter),
# in ./.venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== lint-imports"
.venv/bin/lint-imports
