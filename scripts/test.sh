#!/usr/bin/env bash
# The test command from README.md: set up, then lint, type-check and run the
# whole suite against real Redis and LiveKit servers (started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

bash scripts/lint.sh
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $status
