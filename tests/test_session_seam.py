"""The parts of livekit-agents the worker runs jobs through, which are not public API.

If an upgrade moves any of these, this fails by name instead of sessions
failing at run time (pyproject.toml pins the minor series for this reason).
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
from pathlib import Path
from typing import Any, get_args

import livekit.agents
import pytest
from livekit import rtc
from livekit.agents import job as lk_job
from livekit.agents.utils import http_context
from livekit.protocol.agent import Job

from openrtc.session import livekit_parts
from openrtc.session import session as session_module
from openrtc.session.session import new_job_process


def params(obj: object) -> list[str]:
    return list(inspect.signature(obj).parameters)  # type: ignore[arg-type]


def test_livekit_agents_version_is_the_pinned_series() -> None:
    assert livekit.agents.__version__.startswith("1.8.")


def test_job_context_constructor() -> None:
    assert params(lk_job.JobContext.__init__) == [
        "self",
        "proc",
        "info",
        "room",
        "on_connect",
        "on_shutdown",
        "inference_executor",
    ]
    for name in ("_on_setup", "_on_cleanup", "connect", "job", "room", "shutdown"):
        assert hasattr(lk_job.JobContext, name), name


def test_running_job_info_and_accept_arguments() -> None:
    fields = params(lk_job.RunningJobInfo)
    assert fields[:6] == ["accept_arguments", "job", "url", "token", "worker_id", "fake_job"]
    assert params(lk_job.JobAcceptArguments) == ["name", "identity", "metadata", "attributes"]


def test_job_process_and_context_var() -> None:
    assert params(lk_job.JobProcess.__init__) == [
        "self",
        "executor_type",
        "user_arguments",
        "http_proxy",
    ]
    assert {e.name for e in lk_job.JobExecutorType} >= {"PROCESS", "THREAD"}
    # get_job_context(), which agent code calls, reads the variable the worker sets.
    marker = object()
    token = lk_job._JobContextVar.set(marker)  # type: ignore[arg-type]
    try:
        assert livekit.agents.get_job_context() is marker
    finally:
        lk_job._JobContextVar.reset(token)


def test_http_context_hooks() -> None:
    assert callable(http_context._new_session_ctx)
    assert inspect.iscoroutinefunction(http_context._close_http_ctx)


# -- every part listed in openrtc.session.livekit_parts, by name ----------------------


def resolve(path: str) -> Any:
    """The module, class or attribute a dotted path names."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ImportError(path)


def an_instance(owner: Any) -> Any:
    """An instance of ``owner`` as the seam builds one (its constructor sets the part)."""
    if owner is lk_job.JobContext:
        info = lk_job.RunningJobInfo(
            accept_arguments=lk_job.JobAcceptArguments(
                name="a", identity="agent-AJ_x", metadata="", attributes={}
            ),
            job=Job(id="AJ_x"),
            url="ws://127.0.0.1:1",
            token="",
            worker_id="w",
            fake_job=False,
        )
        return livekit_parts.new_job_context(
            new_job_process("coroutine"), info, rtc.Room(), lambda _: None
        )
    return owner()


@pytest.mark.anyio  # rtc.Room() and AgentSession() want a running loop
@pytest.mark.parametrize("part", livekit_parts.PARTS, ids=str)
async def test_each_listed_livekit_agents_part_is_there(part: livekit_parts.Part) -> None:
    owner = resolve(part.owner)
    if part.kind == "instance":
        assert hasattr(an_instance(owner), part.name), f"{part} is gone"
        return
    assert hasattr(owner, part.name), f"{part} is gone"
    found = getattr(owner, part.name)
    if part.kind == "callable":
        assert callable(found), f"{part} is not callable"
        missing = set(part.expect) - set(params(found))
        assert not missing, f"{part} no longer takes {sorted(missing)}"
    elif part.kind == "members":
        names = (
            {m.name for m in found} if isinstance(found, enum.EnumMeta) else set(get_args(found))
        )
        missing = set(part.expect) - names
        assert not missing, f"{part} no longer has {sorted(missing)}"


def test_the_seam_reaches_livekit_agents_internals_only_through_livekit_parts() -> None:
    """Every private livekit name session.py uses goes through the listed module."""
    source = Path(session_module.__file__).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("livekit"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"session.py imports {private} from {node.module}"
            assert node.module in {"livekit", "livekit.agents"}, node.module
    for token in ("._info", "._userdata", "._shutdown_callbacks", "._on_setup", "._on_cleanup"):
        assert token not in source, token


def test_the_console_reaches_livekit_agents_internals_only_through_livekit_parts() -> None:
    """``openrtc console`` (openrtc.session.console) too: its private livekit names are listed."""
    from openrtc.session import console

    source = Path(console.__file__).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("livekit"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"console.py imports {private} from {node.module}"
            assert "_legacy" not in (node.module or ""), node.module
    assert "_legacy" not in source
