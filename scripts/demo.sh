#!/usr/bin/env bash
# The README's "run it" command: set up, start real servers, route the seed's calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
