#!/usr/bin/env bash
# Install everything openrtc's tests, demo and benchmarks need, on a fresh
# Debian machine or a warm one (then it takes seconds):
#   - Debian's redis-server
#   - a real livekit-server, built from source once and cached (scripts/livekit-server.sh)
#   - the project and its dev tools in ./.venv
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null; then
  log "installing redis-server (apt)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# The Debian package may start a system-wide server; ours are private and on
# free ports, so it is left alone.

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.openrtc-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  log "installing openrtc[dev,tracing] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,tracing]"
  touch "$stamp"
fi

LIVEKIT_SERVER_BIN="$(bash scripts/livekit-server.sh)"
log "livekit-server: $LIVEKIT_SERVER_BIN"
log "redis-server:   $(command -v redis-server)"
