"""scripts/livekit-server.sh reports elapsed time while the first build runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.support.paths import REPO_ROOT

FAKE_GO = """#!/usr/bin/env bash
# Stands in for `go`: a download that names a directory, a build that lasts until
# the test releases it (so the ticker's lines, not a duration, decide when it ends).
case "$1" in
  mod) echo "{\\"Dir\\": \\"$FAKE_GO_DIR\\"}" ;;
  build)
    until [[ -e "$RELEASE_BUILD" ]]; do "$REAL_SLEEP" 0.05; done
    printf '#!/bin/sh\\n' > "$3"; chmod +x "$3" ;;
esac
"""

FAKE_SLEEP = """#!/usr/bin/env bash
# Stands in for the ticker's `sleep`: once $LONG_NAPS exists, a nap lasts an hour
# and notes its pid there, so a nap left behind would hold the caller's pipes.
if [[ -e "$LONG_NAPS" ]]; then echo $$ >> "$LONG_NAPS"; exec "$REAL_SLEEP" 3600; fi
exec "$REAL_SLEEP" "$@"
"""

#: Liveness only: every step below takes well under a second on an idle machine.
GENEROUS = 60.0


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _wait_for(done: Path, what: str) -> None:
    deadline = time.monotonic() + GENEROUS
    while not done.exists() or not done.read_text().strip():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_first_build_prints_elapsed_time_lines_without_a_tty_and_leaves_no_ticker(
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "go", FAKE_GO)
    _executable(bin_dir / "sleep", FAKE_SLEEP)
    (tmp_path / "module").mkdir()
    cache = tmp_path / "cache"
    long_naps, release = tmp_path / "long-naps", tmp_path / "release-build"
    real_sleep = shutil.which("sleep")
    assert real_sleep is not None
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_GO_DIR": str(tmp_path / "module"),
        "OPENRTC_CACHE_DIR": str(cache),
        "PROGRESS_EVERY": "0.2",
        "REAL_SLEEP": real_sleep,
        "LONG_NAPS": str(long_naps),
        "RELEASE_BUILD": str(release),
    }
    # Pipes, not a terminal: what CI sees.
    script = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "livekit-server.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stderr is not None
        seen: list[str] = []
        while sum(line.endswith("s elapsed\n") for line in seen) < 2:
            line = script.stderr.readline()
            assert line, "".join(seen)  # EOF before two ticks
            seen.append(line)
        # The ticker's next nap lasts an hour: end the build during it.
        long_naps.touch()
        _wait_for(long_naps, "the ticker's long nap")
        release.touch()
        rest: list[str] = []
        # Read to the end of both pipes: had the nap outlived the script, the
        # pipe would stay open for its hour.
        reader = threading.Thread(
            target=lambda: rest.extend([script.stdout.read(), script.stderr.read()])  # type: ignore[union-attr]
        )
        reader.start()
        reader.join(GENEROUS)
        assert not reader.is_alive(), "a pipe still open after the build"
        script.wait(GENEROUS)
        out, err = rest
    finally:
        if script.poll() is None:
            script.kill()
        for pid in long_naps.read_text().split() if long_naps.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert script.returncode == 0, err
    binary = cache / "livekit-server-v1.13.5"
    assert out == f"{binary}\n"
    assert os.access(binary, os.X_OK)
    stderr = "".join(seen) + err
    ticks = [line for line in stderr.splitlines() if line.endswith("s elapsed")]
    assert len(ticks) >= 2, stderr
    assert all(line.startswith("building livekit-server v1.13.5: ") for line in ticks)
    assert "built livekit-server v1.13.5 in " in stderr

    # Warm: the cached binary, at once and silently.
    again = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "livekit-server.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=GENEROUS,
    )
    assert again.stdout == f"{binary}\n"
    assert again.stderr == ""
