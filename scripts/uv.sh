#!/usr/bin/env bash
# Install (once) and print the path of the uv that reads and writes uv.lock.
#
# The version is pyproject.toml's `[tool.uv] required-version`, the one place it
# is written; uv itself refuses to run this project at any other version. The
# binary lives in the cache beside the livekit-server build, so a fresh clone on
# a warm machine reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
version="$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["uv"]["required-version"].removeprefix("=="))')"
CACHE_DIR="${OPENRTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/openrtc}"
dir="$CACHE_DIR/uv-$version"
UV="$dir/bin/uv"

if [[ -x "$UV" ]]; then
  echo "$UV"
  exit 0
fi
mkdir -p "$CACHE_DIR"
echo "installing uv $version into $dir" >&2
tmp="$dir.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
# --target: no venv (python3-venv is not on every Debian), no ensurepip.
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "error: $PYTHON has no pip to install uv with (Debian: apt-get install python3-pip)" >&2
  exit 1
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-cache-dir --root-user-action=ignore \
  --target "$tmp" "uv==$version" >&2
rm -rf "$dir"
mv "$tmp" "$dir"
"$UV" --version >&2
echo "$UV"
