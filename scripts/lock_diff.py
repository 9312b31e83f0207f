"""Print what changed between two uv.lock files: `name: old -> new`, one line each.

Used by scripts/upgrade-deps.sh; standard library only, so it runs before any
venv exists.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def versions(lock: Path) -> dict[str, str]:
    """Each locked package's version (the project itself, being editable, included)."""
    data = tomllib.loads(lock.read_text())
    found: dict[str, set[str]] = {}
    for package in data.get("package", []):
        found.setdefault(package["name"], set()).add(package.get("version", "?"))
    # A package locked at two versions (split by Python version) shows both.
    return {name: ", ".join(sorted(v)) for name, v in found.items()}


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The changed, added and removed packages, sorted by name."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before != after:
            lines.append(f"{name}: {before or '(none)'} -> {after or '(removed)'}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: lock_diff.py OLD_LOCK NEW_LOCK", file=sys.stderr)
        return 2
    lines = changes(versions(Path(argv[0])), versions(Path(argv[1])))
    print("\n".join(lines) if lines else "no package changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
