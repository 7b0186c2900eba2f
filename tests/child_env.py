"""The environment of a child Python process a test starts: this checkout first on PYTHONPATH, the
caller's entries after it (a machine may install the dependencies on PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
