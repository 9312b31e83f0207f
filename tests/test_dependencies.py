"""The lock file: what this repository's own runs install, and how it moves.

uv.lock pins every package of the project, its extras and its dev groups;
scripts/setup.sh installs from it (scripts/sync.sh), refuses a lock that
pyproject.toml has moved away from (scripts/check-lock.sh), and
scripts/upgrade-deps.sh moves it on purpose (printing old -> new with
scripts/lock_diff.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import redis

from tests.support.paths import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def _locked(lock: Path) -> dict[str, str]:
    return {p["name"]: p["version"] for p in tomllib.loads(lock.read_text())["package"]}


def _uv_version() -> str:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    required: str = pyproject["tool"]["uv"]["required-version"]
    assert required.startswith("=="), "pin uv exactly: the lock format follows its version"
    return required.removeprefix("==")


def test_the_lock_matches_pyproject() -> None:
    result = subprocess.run(
        ["bash", SCRIPTS / "check-lock.sh"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_venv_holds_exactly_the_locked_versions() -> None:
    # `uv sync --check` fails on any package missing, extra or at another version.
    result = subprocess.run(
        ["bash", SCRIPTS / "sync.sh", "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # And the interpreter running these tests is that venv's.
    locked = _locked(REPO_ROOT / "uv.lock")
    assert Path(sys.prefix).resolve() == (REPO_ROOT / ".venv").resolve()
    assert redis.__version__ == locked["redis"]


def test_a_range_edited_without_relocking_fails_with_one_line(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '"redis>=8.1,<9"' in text
    pyproject.write_text(text.replace('"redis>=8.1,<9"', '"redis>=8.0,<9"'))
    result = subprocess.run(
        ["bash", tmp_path / "scripts" / "check-lock.sh"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: uv.lock does not match pyproject.toml: run ")
    assert "scripts/upgrade-deps.sh" in lines[0]


def test_uv_is_installed_once_at_the_pinned_version(tmp_path: Path) -> None:
    env = {**os.environ, "OPENRTC_CACHE_DIR": str(tmp_path)}
    first = subprocess.run(
        ["bash", SCRIPTS / "uv.sh"], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr
    uv = Path(first.stdout.strip())
    assert uv == tmp_path / f"uv-{_uv_version()}" / "bin" / "uv"
    version = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.split()[1] == _uv_version()
    # Warm: the cached binary, at once and silently.
    again = subprocess.run(
        ["bash", SCRIPTS / "uv.sh"], capture_output=True, text=True, env=env, timeout=30
    )
    assert (again.stdout, again.stderr) == (first.stdout, "")


def test_the_docker_image_installs_from_the_lock() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG UV_VERSION={re.escape(_uv_version())}$", dockerfile, re.M)
    syncs = re.findall(r"^RUN uv sync .*$", dockerfile, re.M)
    assert syncs, "the image installs with uv sync"
    assert all("--locked" in line and "--no-dev" in line for line in syncs)
    # Nothing else installs Python packages (the pip line installs uv itself).
    pips = re.findall(r"pip install .*$", dockerfile, re.M)
    assert pips == ['pip install --no-cache-dir "uv==${UV_VERSION}"']


def test_the_legacy_bench_venv_is_locked_on_our_livekit_agents_and_protobuf() -> None:
    ours = _locked(REPO_ROOT / "uv.lock")
    legacy = _locked(REPO_ROOT / "bench" / "legacy" / "uv.lock")
    assert legacy["openrtc"] == "0.20.1"
    for name in ("livekit-agents", "protobuf"):
        assert legacy[name] == ours[name], f"re-lock bench/legacy: {name}"
    uv = subprocess.run(["bash", SCRIPTS / "uv.sh"], capture_output=True, text=True, check=True)
    check = subprocess.run(
        [uv.stdout.strip(), "lock", "--check", "--project", REPO_ROOT / "bench" / "legacy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def _lock(path: Path, packages: dict[str, list[str]]) -> Path:
    body = "version = 1\n" + "".join(
        f'\n[[package]]\nname = "{name}"\nversion = "{v}"\n'
        for name, versions in packages.items()
        for v in versions
    )
    path.write_text(body)
    return path


@pytest.mark.unit
@pytest.mark.parametrize(
    ("old", "new", "printed"),
    [
        ({"redis": ["8.1.0"]}, {"redis": ["8.1.0"]}, ["no package changed"]),
        ({"redis": ["8.1.0"]}, {"redis": ["8.2.0"]}, ["redis: 8.1.0 -> 8.2.0"]),
        ({"a": ["1"]}, {"a": ["1"], "b": ["2"]}, ["b: (none) -> 2"]),
        ({"a": ["1"], "b": ["2"]}, {"a": ["1"]}, ["b: 2 -> (removed)"]),
        (
            {"z": ["1"], "a": ["1"]},
            {"z": ["2"], "a": ["3"]},
            ["a: 1 -> 3", "z: 1 -> 2"],
        ),
        # Locked at two versions for two Python ranges: both are shown.
        ({"numpy": ["2.3.0"]}, {"numpy": ["2.3.0", "2.4.1"]}, ["numpy: 2.3.0 -> 2.3.0, 2.4.1"]),
    ],
)
def test_lock_diff_prints_each_changed_package(
    tmp_path: Path, old: dict[str, list[str]], new: dict[str, list[str]], printed: list[str]
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            SCRIPTS / "lock_diff.py",
            _lock(tmp_path / "old.lock", old),
            _lock(tmp_path / "new.lock", new),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == printed
