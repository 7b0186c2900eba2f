"""Atomic file and directory writes, and JSONL reading with file:line errors.

Nothing partial is ever left under a final name: writers go to a temp sibling first and are
renamed into place only after they finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from miles_core.errors import MilesError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _apply_umask(tmp, 0o666)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MilesError(f"output '{path}' already exists; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    _apply_umask(tmp, 0o777)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(path: str | Path, mode: int) -> None:
    """Temp files and folders are created private (0600/0700); give the final ones the
    permissions a plain open()/mkdir() would, so others (an inference server) can read them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", record) for every non-blank line; bad JSON raises file:line."""
    path = Path(path)
    if not path.is_file():
        raise MilesError(f"file not found: '{path}'")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise MilesError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
