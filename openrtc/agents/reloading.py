"""Hot reload's policy: which agents a save in the agents directory touches.

An agent module may import helper modules that live beside it (``_prompts.py``,
``tools/``; the directory is on ``sys.path``, see
:meth:`~openrtc.agents.registry.AgentPool.discover`). A save of any of them
reloads every agent whose module imports it, directly or through another
helper. The imports are read from the files' source (``ast``), not from what
ran: a module is judged by what it says now, and nothing is executed to find out.

:func:`reload_agents` applies it to a pool: stale helper modules leave
``sys.modules`` (the agents' fresh imports load them again), each touched agent
is imported again, and a module that fails keeps its old code registered; each
failure is one line, ``file:line: error``.
"""

from __future__ import annotations

import ast
import sys
import traceback
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrtc.agents.registry import AgentConfig, AgentPool

__all__ = [
    "Reloaded",
    "affected",
    "import_graph",
    "imported_names",
    "is_pinned",
    "pin_reload",
    "reload_agent",
    "reload_agents",
]

_pinned: weakref.WeakSet[Any] = weakref.WeakSet()


def pin_reload(session: Any) -> None:
    """Keep this live call on the code it started with when its agent is hot-reloaded.

    For a call that must not change behaviour halfway (a payment flow under
    test): it finishes on the old code; new calls get the new code. Call it
    with the ``AgentSession`` (``self.session`` in ``on_enter``). Outside hot
    reload it does nothing.
    """
    _pinned.add(session)


def is_pinned(session: Any) -> bool:
    """Whether :func:`pin_reload` pinned ``session``."""
    return session in _pinned


def imported_names(source: str) -> set[str]:
    """The absolute module names ``source`` imports, each with its parent packages.

    ``import a.b`` and ``from a.b import c`` name ``a``, ``a.b`` (and
    ``a.b.c``, which may be a submodule). Relative imports are skipped: agent
    modules are not loaded as parts of a package. Source that does not parse
    imports nothing (its import fails and says why).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            dotted = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in dotted:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _module_names(directory: Path) -> dict[str, Path]:
    """Module name -> file, for every Python module under ``directory``."""
    found: dict[str, Path] = {}
    for path in sorted(directory.rglob("*.py")):
        relative = path.relative_to(directory).with_suffix("")
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if parts:
            found[".".join(parts)] = path.resolve()
    return found


def import_graph(directory: Path) -> dict[Path, frozenset[Path]]:
    """Each module file under ``directory`` -> the files there it imports."""
    modules = _module_names(directory)
    graph: dict[Path, frozenset[Path]] = {}
    for path in modules.values():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            source = ""
        local = {modules[name] for name in imported_names(source) if name in modules}
        graph[path] = frozenset(local - {path})
    return graph


def affected(graph: Mapping[Path, Iterable[Path]], changed: Iterable[Path]) -> set[Path]:
    """The changed files and every file that imports one of them, directly or not."""
    importers: dict[Path, set[Path]] = {}
    for module, imports in graph.items():
        for imported in imports:
            importers.setdefault(imported, set()).add(module)
    found: set[Path] = set()
    pending = list(changed)
    while pending:
        path = pending.pop()
        if path not in found:
            found.add(path)
            pending.extend(importers.get(path, ()))
    return found


@dataclass
class Reloaded:
    """What one reload did: agents now on new code, and one line per module that failed."""

    configs: list[AgentConfig] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def reload_agents(pool: AgentPool, directory: Path, changed: Iterable[Path]) -> Reloaded:
    """Import again every agent of ``pool`` that the ``changed`` files touch.

    A failing agent keeps its old code (see :meth:`AgentPool.reload`); the
    others reload all the same.
    """
    directory = directory.resolve()
    stale = affected(import_graph(directory), (Path(p).resolve() for p in changed))
    agents = {c.source_path: c.name for c in pool if c.source_path is not None}
    _forget_helpers(stale - set(agents))
    result = Reloaded()
    for path, name in agents.items():
        if path not in stale:
            continue
        try:
            result.configs.append(pool.reload(name))
        except Exception as exc:  # whatever the module did: the old code keeps serving
            result.errors.append(error_line(exc, path, directory))
    return result


def reload_agent(pool: AgentPool, name: str) -> AgentConfig:
    """Agent ``name`` imported again with every helper beside it (a session process's
    reload: its worker decided what changed). Raises as :meth:`AgentPool.reload`."""
    path = pool.get(name).source_path
    if path is not None:
        directory = path.parent.resolve()
        _forget_helpers(set(directory.rglob("*.py")) - {path})
    return pool.reload(name)


def _forget_helpers(paths: set[Path]) -> None:
    """Drop the modules of these files from ``sys.modules``: the next import reads the file."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() in paths:
            del sys.modules[name]


def error_line(exc: BaseException, path: Path, directory: Path) -> str:
    """``file:line: Type: message`` for a module that failed to (re)load.

    The line is where the error is in the agents directory: the syntax error's,
    or the last frame there of the exception's traceback (a helper's, when a
    helper raised); the agent file alone when no line says more.
    """
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, SyntaxError) and cause.filename and cause.lineno:
        where = f"{_shown(Path(cause.filename), directory)}:{cause.lineno}"
        return f"{where}: SyntaxError: {cause.msg}"
    where = _shown(path, directory)
    for frame in traceback.extract_tb(cause.__traceback__):
        file = Path(frame.filename).resolve()
        if file.is_relative_to(directory):
            where = f"{_shown(file, directory)}:{frame.lineno}"
    if cause is exc:
        return f"{where}: {exc}"
    return f"{where}: {type(cause).__name__}: {cause}"


def _shown(path: Path, directory: Path) -> str:
    try:
        return str(path.resolve().relative_to(directory))
    except ValueError:
        return str(path)
