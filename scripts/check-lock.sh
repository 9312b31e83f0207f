#!/usr/bin/env bash
# Exit 1 with one line when uv.lock no longer matches pyproject.toml (a
# dependency, extra or group edited without re-locking).
set -euo pipefail
cd "$(dirname "$0")/.."
UV="$(bash scripts/uv.sh)"
if out="$("$UV" lock --check 2>&1)"; then
  exit 0
fi
if grep -q "needs to be updated" <<<"$out"; then
  echo "error: uv.lock does not match pyproject.toml: run 'bash scripts/upgrade-deps.sh' (newest allowed versions) or 'uv lock' (fewest changes) and commit uv.lock" >&2
else
  # Not a stale lock (no network, a broken pyproject.toml): uv's own words.
  printf '%s\n' "$out" >&2
fi
exit 1
