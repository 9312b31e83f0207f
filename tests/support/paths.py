"""Where the tests find the repository and write their servers' logs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(os.environ.get("OPENRTC_TEST_LOG_DIR", REPO_ROOT / ".openrtc" / "test-logs"))


def forget_agents_dir(directory: Path) -> None:
    """Undo what discovering ``directory`` did to this process: its entry on
    ``sys.path`` and the modules imported from it (the next test's helper
    modules of the same name must not be found here)."""
    import sys

    entry = str(directory.resolve())
    while entry in sys.path:
        sys.path.remove(entry)
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(entry + os.sep):
            del sys.modules[name]
