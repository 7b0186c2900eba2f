"""Atomic file and directory writes, and JSONL reading with file:line errors.

Nothing partial is ever left under a final name: writers go to a temp sibling first and are
renamed into place only after they finished. A temp sibling is named
`.<name>.miles-<pid>-<random>.tmp`; one whose process is gone (killed with -9, power loss) is
removed the next time anything is written to the same folder, with a note on the `miles` logger.
Outputs are checked before long work starts: `check_output` refuses an existing file (unless
overwriting), a folder, a parent that is a file or not writable, and any input of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from miles_core.errors import MilesError

log = logging.getLogger("miles")
_TMP = re.compile(r"^\.(?P<name>.+)\.miles-(?P<pid>\d+)-[^.]*\.tmp$")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, durable: bool = False) -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; rename it onto `path` only if the block succeeds.
    `durable`: fsync the file before the rename and the folder after it (survives power loss)."""
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    _apply_umask(tmp, 0o666)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only if the block succeeds. `durable`: fsync
    every file and folder in it before the rename, and the parent after it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MilesError(f"output '{path}' already exists; remove it or choose another path")
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    _apply_umask(tmp, 0o777)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first."""
    folders = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        folders += [Path(dirpath) / d for d in dirnames]
        for name in filenames:
            fsync_path(Path(dirpath) / name)
    for folder in reversed(folders):
        fsync_path(folder)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.miles-{os.getpid()}-"


def _make_parent(path: Path) -> None:
    """Create `path`'s folder (a clear error when that cannot be), then clear stale temporaries."""
    check_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove our temp siblings in `folder` whose writing process no longer runs."""
    removed = []
    for entry in os.scandir(folder):
        match = _TMP.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        size = _tree_size(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
        log.info("removed '%s' (%.1f MiB), an unfinished write of '%s' left by process %s, which no longer runs",
                 entry.path, size / 2**20, match["name"], match["pid"])
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _tree_size(path: Path) -> int:
    try:
        if not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*"))
    except OSError:  # removed meanwhile, or unreadable: the size is only for the note
        return 0


def check_parent(path: str | Path) -> None:
    """`MilesError` unless `path` can be created: its nearest existing ancestor must be a
    writable folder (os.access also says no on a read-only file system, even to root)."""
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MilesError(f"cannot write '{path}': '{ancestor}' is a file, expected a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MilesError(f"cannot write '{path}': folder '{ancestor}' is not writable")


def check_output(path: str | Path, *, overwrite: bool, inputs: list[str | Path] = (), flag: str = "--output") -> None:
    """Refuse to write `path` where that would lose data: an existing file (unless `overwrite`),
    a folder, or any of `inputs` (a file, or a file in an input folder) even with `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise MilesError(f"{flag} '{path}' is a folder; expected a file path")
    for source in inputs:
        source = Path(source)
        if _same_or_inside(path, source):
            raise MilesError(f"{flag} '{path}' would overwrite the input '{source}'; choose another path")
    if path.exists() and not overwrite:
        raise MilesError(f"{flag} '{path}' already exists; pass --overwrite to replace it or choose another path")
    check_parent(path)


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """`MilesError` unless `path` is, or can be made, a folder we can write in. Stale temporaries
    in it and its subfolders (a checkpoint save killed with -9) are removed first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MilesError(f"{flag} '{path}' is a file; expected a folder")
    check_parent(path / "x")
    if path.is_dir():
        for folder in [path, *(p for p in path.iterdir() if p.is_dir() and not _TMP.match(p.name))]:
            remove_stale_temporaries(folder)


def _same_or_inside(path: Path, source: Path) -> bool:
    if not (source.exists() and path.exists()):
        return False
    if source.is_dir():
        return path.resolve().is_relative_to(source.resolve())
    return os.path.samefile(path, source)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; other bytes are one clear error naming the file and the offset."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MilesError(f"{what} '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}); save it as UTF-8") from None


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
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MilesError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise MilesError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
