"""Where the tests find the repository and write their servers' logs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(os.environ.get("OPENRTC_TEST_LOG_DIR", REPO_ROOT / ".openrtc" / "test-logs"))
