#!/usr/bin/env bash
# Move uv.lock to the newest versions pyproject.toml allows, install them, and
# run the quick gate (ruff, mypy, the unit tier), so an upgrade is a reviewed
# commit of its own. Prints `name: old -> new` for every package that changed.
#   bash scripts/upgrade-deps.sh                 # everything
#   bash scripts/upgrade-deps.sh redis anyio     # only these (and what they need)
# Then: bash scripts/test.sh, and commit uv.lock with the figures it printed.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="$(bash scripts/uv.sh)"
PYTHON="${PYTHON:-python3}"

before="$(mktemp)"
trap 'rm -f "$before"' EXIT
cp uv.lock "$before"
if [[ $# -eq 0 ]]; then
  "$UV" lock --upgrade
else
  args=()
  for name in "$@"; do args+=(--upgrade-package "$name"); done
  "$UV" lock "${args[@]}"
fi
"$PYTHON" scripts/lock_diff.py "$before" uv.lock

bash scripts/sync.sh
bash scripts/lint.sh
echo "== unit tests"
.venv/bin/python -m pytest -m unit -q
echo "upgrade ready: review the versions above, run bash scripts/test.sh, commit uv.lock"
