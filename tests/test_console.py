"""``openrtc console AGENT``: the agent's real session from the terminal, no server at all.

Run as a user runs it (a subprocess), with the offline agents: their LLM
answers by rules (openrtc.agents.offline.offline_reply), so each reply is known.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from openrtc.session.console import reply_line

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_AGENTS = REPO_ROOT / "examples" / "offline_agents"
OPENRTC = [sys.executable, "-m", "openrtc"]
#: Generous: the machine is shared; a console turn with the offline agents takes milliseconds.
TIMEOUT = 180


def console(
    *args: str | Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRTC_", "LIVEKIT_"))}
    return subprocess.run(
        [*OPENRTC, "console", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**clean, **(env or {})},
        cwd=REPO_ROOT,
    )


def test_text_mode_prints_the_greeting_then_one_reply_per_input_line() -> None:
    said = "hi\n\nbook a table for 4\nwhat did I say first?\n"
    result = console("restaurant", "--text", "--agents-dir", OFFLINE_AGENTS, stdin=said)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Trattoria Luca, offline line. A table for how many?",
        "Noted: hi",
        # The agent's real tool ran: its call on stderr, its result in the reply.
        "Done: table for 4 booked",
        # The conversation is one session: the LLM sees the first line.
        "You first said: hi",
    ]
    assert 'tool book_table({"party_size": 4}) -> table for 4 booked' in result.stderr


def test_the_scripted_example_of_the_readme_works_and_logs_stay_off_stdout() -> None:
    """`printf 'hi\\n' | openrtc console dental --text`: even at DEBUG, stdout is the replies."""
    result = console(
        "dental", "--text", "--agents-dir", OFFLINE_AGENTS, "--log-level", "DEBUG", stdin="hi\n"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Bright Smile Dental, offline line. How can we help you today?",
        "Noted: hi",
    ]
    assert "DEBUG" in result.stderr  # the logs were there, on the other stream


def test_an_unknown_agent_is_the_routing_error_and_exit_1() -> None:
    result = console("nope", "--text", "--agents-dir", OFFLINE_AGENTS)
    routed = subprocess.run(
        [*OPENRTC, "route", "--agents-dir", OFFLINE_AGENTS, "--job-metadata", '{"agent": "nope"}'],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: Unknown agent 'nope' requested via job metadata.\n"
    assert result.stderr == routed.stderr


def test_audio_mode_without_sound_devices_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A machine without PortAudio, as this sounddevice says on import there."""
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    result = console("dental", "--agents-dir", OFFLINE_AGENTS, env={"PYTHONPATH": str(tmp_path)})

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: no sound devices here (PortAudio library not found); use --text\n"
    )


def _agent(tmp_path: Path, source: str) -> Path:
    (tmp_path / "agent.py").write_text(textwrap.dedent(source))
    return tmp_path


def test_an_agent_that_ends_the_call_ends_the_console_with_exit_0(tmp_path: Path) -> None:
    agents = _agent(
        tmp_path,
        """
        from livekit.agents import Agent, RunContext, function_tool
        from openrtc import agent_config
        from openrtc.offline import OfflineLLM

        @agent_config(name="ender", llm=OfflineLLM(), greeting="Hello.")
        class Ender(Agent):
            def __init__(self) -> None:
                super().__init__(instructions="Ends the call once a table is booked.")

            @function_tool
            async def book_table(self, context: RunContext, party_size: int) -> str:
                \"\"\"Book a table.\"\"\"
                context.session.shutdown()
                return "goodbye"
        """,
    )
    said = "hi\nbook a table for 2\nare you still there?\n"
    result = console("ender", "--text", "--agents-dir", agents, stdin=said)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Hello.", "Noted: hi", "Done: goodbye"]


def test_an_agent_that_cannot_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    agents = _agent(
        tmp_path,
        """
        from livekit.agents import Agent
        from openrtc import agent_config
        from openrtc.offline import OfflineLLM

        @agent_config(name="broken", llm=OfflineLLM())
        class Broken(Agent):
            def __init__(self) -> None:
                raise RuntimeError("no database")
        """,
    )
    result = console("broken", "--text", "--agents-dir", agents, stdin="hi\n")

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "error: the agent failed to start: Agent 'broken' (agent.py:Broken) cannot be built: "
        "RuntimeError: no database"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("texts", "line"),
    [
        ([], ""),
        (["Noted: hi"], "Noted: hi"),
        (["One moment.", "Done: booked"], "One moment. Done: booked"),
        (["two\nlines"], "two lines"),
        (["  ", "kept "], "kept"),
    ],
)
def test_a_turn_is_one_line(texts: list[str], line: str) -> None:
    assert reply_line(texts) == line
