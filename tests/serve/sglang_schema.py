"""SGLang's own JSON schema for the native API (`sglang/api/v1/api_types.py`, generated msgspec
structs), loaded by file path with only `msgspec`. The file comes from the sglang wheel (pinned
version), fetched once with `pip download --no-deps` into ~/.cache/miles; tests that need it skip
when it cannot be had (no registry access)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

SGLANG_VERSION = "0.5.23"
CACHE = Path.home() / ".cache" / "miles" / f"sglang-{SGLANG_VERSION}" / "api_types.py"
MEMBER = "sglang/api/v1/api_types.py"


def _fetch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.11", "--platform", "manylinux_2_34_x86_64",
                        f"sglang=={SGLANG_VERSION}", "-d", tmp], check=True, capture_output=True, timeout=300)
        wheel = next(Path(tmp).glob("sglang-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_bytes(archive.read(MEMBER))


def load_api_types():
    """The module, or skip the test."""
    pytest.importorskip("msgspec")
    if not CACHE.is_file():
        try:
            _fetch()
        except (subprocess.SubprocessError, OSError, StopIteration, KeyError) as err:
            pytest.skip(f"SGLang's api_types.py unavailable ({type(err).__name__})")
    spec = importlib.util.spec_from_file_location("sglang_api_types", CACHE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sglang_api_types"] = module
    spec.loader.exec_module(module)
    return module
