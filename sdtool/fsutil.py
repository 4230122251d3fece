"""Atomic writes: a temp file in the same folder, fsync, then `os.replace`.

An interrupted run (even `kill -9`) leaves either the old file or the whole new one under the final name, never a
half-written file. Temp files are named `.<name>.<random>.tmp` so that they are easy to recognise and clean up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    Works for files and for folders (e.g. a diffusers model folder written by `save_pretrained`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_file():
            _fsync_file(tmp)
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = path.with_name(f".{path.name}.old{TEMP_SUFFIX}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temp files an interrupted atomic write left behind (for tests and clean-up)."""
    return sorted(p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}"))
