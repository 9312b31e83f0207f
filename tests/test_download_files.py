"""``openrtc download-files``: every plugin the agents registered downloads its files.

The plugins are real ``livekit.agents.Plugin`` subclasses that an agent module
of the test registers on import, as livekit plugins do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from openrtc.agents.plugins import PluginDownload

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENRTC = [sys.executable, "-m", "openrtc"]
TIMEOUT = 180

PLUGINS = """
    import os
    from pathlib import Path

    from livekit.agents import Agent, Plugin
    from openrtc import agent_config


    class Unreachable(Plugin):
        def download_files(self) -> None:
            raise ConnectionError("model host unreachable")


    class Model(Plugin):
        def download_files(self) -> None:
            Path(os.environ["MODEL_DIR"], "model.bin").write_bytes(b"weights")


    class NothingToFetch(Plugin):
        pass


    for plugin in {plugins}:
        Plugin.register_plugin(plugin)


    @agent_config(name="voice")
    class Voice(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="Uses the plugins.")
"""
UNREACHABLE = 'Unreachable("Unreachable", "0.1.0", "test.plugins.unreachable")'
MODEL = 'Model("Model", "1.2.0", "test.plugins.model")'
NOTHING = 'NothingToFetch("Nothing", "2.0.0", "test.plugins.nothing")'


def download(agents: Path, models: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRTC_")}
    return subprocess.run(
        [*OPENRTC, "download-files", "--agents-dir", str(agents)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**env, "MODEL_DIR": str(models)},
    )


def agents_with(tmp_path: Path, plugins: list[str]) -> tuple[Path, Path]:
    agents, models = tmp_path / "agents", tmp_path / "models"
    agents.mkdir()
    models.mkdir()
    source = textwrap.dedent(PLUGINS).replace("{plugins}", "[" + ", ".join(plugins) + "]")
    (agents / "voice.py").write_text(source)
    return agents, models


def test_each_registered_plugin_downloads_its_files_one_line_each(tmp_path: Path) -> None:
    agents, models = agents_with(tmp_path, [MODEL, NOTHING])
    result = download(agents, models)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("test.plugins.model 1.2.0: files downloaded (")
    assert lines[1] == "test.plugins.nothing 2.0.0: nothing to download"
    assert (models / "model.bin").read_bytes() == b"weights"


def test_a_failed_download_is_named_with_its_error_and_the_rest_still_run(
    tmp_path: Path,
) -> None:
    agents, models = agents_with(tmp_path, [UNREACHABLE, MODEL])
    result = download(agents, models)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: test.plugins.unreachable 0.1.0: download failed: "
        "ConnectionError: model host unreachable"
    ]
    assert result.stdout.startswith("test.plugins.model 1.2.0: files downloaded (")
    assert (models / "model.bin").read_bytes() == b"weights"  # tried after the failure


def test_agents_without_plugins_have_nothing_to_download(tmp_path: Path) -> None:
    result = download(REPO_ROOT / "examples" / "offline_agents", tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no livekit plugins registered by the agents in "
        f"{REPO_ROOT / 'examples' / 'offline_agents'}: nothing to do"
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("download", "line"),
    [
        (PluginDownload("p", "1.0", True, 2.04), "p 1.0: files downloaded (2.0 s)"),
        (PluginDownload("p", "1.0", False, 0.0), "p 1.0: nothing to download"),
        (
            PluginDownload("p", "1.0", True, 0.1, "OSError: no route"),
            "error: p 1.0: download failed: OSError: no route",
        ),
    ],
)
def test_a_plugin_download_is_one_line(download: PluginDownload, line: str) -> None:
    assert download.line() == line
