"""scripts/livekit-server.sh reports elapsed time while the first build runs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.paths import REPO_ROOT

FAKE_GO = """#!/usr/bin/env bash
# Stands in for `go`: a download that names a directory, a build that takes a while.
case "$1" in
  mod) echo "{\\"Dir\\": \\"$FAKE_GO_DIR\\"}" ;;
  build) sleep 2; printf '#!/bin/sh\\n' > "$3"; chmod +x "$3" ;;
esac
"""


def test_first_build_prints_elapsed_time_lines_without_a_tty(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    (tmp_path / "module").mkdir()
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_GO_DIR": str(tmp_path / "module"),
        "OPENRTC_CACHE_DIR": str(cache),
        "PROGRESS_EVERY": "0.5",
    }
    started = time.monotonic()
    # Pipes, not a terminal: what CI sees.
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "livekit-server.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    binary = cache / "livekit-server-v1.13.5"
    assert result.stdout == f"{binary}\n"
    assert os.access(binary, os.X_OK)
    ticks = [line for line in result.stderr.splitlines() if line.endswith("s elapsed")]
    assert len(ticks) >= 2, result.stderr
    assert all(line.startswith("building livekit-server v1.13.5: ") for line in ticks)
    assert "built livekit-server v1.13.5 in " in result.stderr
    # The ticker does not outlive the build holding the caller's pipes open.
    assert took < 10

    # Warm: the cached binary, at once and silently.
    again = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "livekit-server.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert again.stdout == f"{binary}\n"
    assert again.stderr == ""
