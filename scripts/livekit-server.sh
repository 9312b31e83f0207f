#!/usr/bin/env bash
# Build (once) and print the path of a real LiveKit server binary.
#
# The binary is cached outside the repository so a warm machine reuses it;
# the first build takes several minutes. `go install ...@version` cannot be
# used because livekit-server's go.mod carries replace directives, so we
# download the module and build its main package in place (see LIVEKIT.md).
set -euo pipefail

LIVEKIT_VERSION="${LIVEKIT_VERSION:-v1.13.5}"
CACHE_DIR="${OPENRTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/openrtc}"
BIN="$CACHE_DIR/livekit-server-$LIVEKIT_VERSION"

if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "error: Go is needed to build livekit-server" >&2; exit 1; }
mkdir -p "$CACHE_DIR"
echo "building livekit-server $LIVEKIT_VERSION (first run only, takes minutes)..." >&2
# One line every PROGRESS_EVERY seconds while the download and build run, so a
# CI log (no TTY, no carriage returns) shows the build is alive and how long it took.
started=$SECONDS
(
  # The sleep dies with the ticker, or it would hold the caller's pipes open.
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "${PROGRESS_EVERY:-15}" & nap=$!
    wait "$nap"
    echo "building livekit-server $LIVEKIT_VERSION: $((SECONDS - started))s elapsed"
  done
) >&2 &
ticker=$!
tmp="$BIN.tmp.$$"
trap 'kill "$ticker" 2>/dev/null || true; rm -f "$tmp"' EXIT
dir="$(go mod download -json "github.com/livekit/livekit-server@$LIVEKIT_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
(cd "$dir" && GOFLAGS=-mod=mod go build -o "$tmp" ./cmd/server) >&2
mv "$tmp" "$BIN"
echo "built livekit-server $LIVEKIT_VERSION in $((SECONDS - started))s" >&2
echo "$BIN"
