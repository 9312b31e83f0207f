"""The parts of livekit-agents the worker runs jobs through, which are not public API.

If an upgrade moves any of these, this fails by name instead of sessions
failing at run time (pyproject.toml pins the minor series for this reason).
"""

from __future__ import annotations

import inspect

import livekit.agents
from livekit.agents import job as lk_job
from livekit.agents.utils import http_context


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
