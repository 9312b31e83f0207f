#!/usr/bin/env bash
# Install everything openrtc's tests, demo and benchmarks need, on a fresh
# Debian machine or a warm one (then it takes seconds):
#   - Debian's redis-server (with TLS) and openssl (the tests' certificates)
#   - a real livekit-server, built from source once and cached (scripts/livekit-server.sh)
#   - uv (scripts/uv.sh), then the project and its dev tools (the `dev` dependency
#     group) in ./.venv, at the versions uv.lock names (scripts/upgrade-deps.sh moves them)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup %3ds] %s\n' "$SECONDS" "$*" >&2; }

# Debian's redis-server is built with TLS; openssl makes the tests' certificates.
if ! command -v redis-server >/dev/null || ! command -v openssl >/dev/null; then
  log "installing redis-server and openssl (apt)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server openssl >/dev/null
fi
# The Redis Cluster and Sentinel tests need redis-cli (--cluster create) and a
# redis-server with cluster and sentinel modes (Debian's has both).
if ! command -v redis-cli >/dev/null; then
  log "installing redis-cli (apt: redis-tools)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-tools >/dev/null
fi
# libfaketime: the clock-skew tests run workers and dispatchers with their
# clocks off (tests/test_clock_skew.py).
if ! compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null; then
  log "installing libfaketime (apt: faketime)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq faketime >/dev/null
fi
# The Debian package may start a system-wide server; ours are private and on
# free ports, so it is left alone.

# promtool checks deploy/prometheus's alert rules in the tests; Debian ships
# it in the prometheus package (which also installs a Prometheus server; on a
# systemd host Debian starts it on :9090: `systemctl disable --now prometheus`).
if ! command -v promtool >/dev/null; then
  log "installing promtool (apt: prometheus)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# tmux: `openrtc top`'s interactive view is tested in a real terminal
# (tests/test_top_cli.py drives it with send-keys and reads capture-pane).
if ! command -v tmux >/dev/null; then
  log "installing tmux (apt: tmux)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq tmux >/dev/null
fi

# The project, its extras and its dev group, at exactly the versions in uv.lock
# (scripts/sync.sh); a lock that pyproject.toml has moved away from stops here
# with one line saying how to re-lock.
bash scripts/check-lock.sh
log "installing openrtc[hiredis,tracing] and its dev group into .venv (uv.lock)"
bash scripts/sync.sh

LIVEKIT_SERVER_BIN="$(bash scripts/livekit-server.sh)"
log "livekit-server: $LIVEKIT_SERVER_BIN"
log "redis-server:   $(command -v redis-server)"
log "promtool:       $(command -v promtool)"
log "tmux:           $(command -v tmux)"
