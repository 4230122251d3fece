"""Files sdtool writes and the small files it reads: atomic writes, their leftovers, and bounded reads.

Writes: a temp file (or folder) in the same folder, fsync, then `os.replace`. An interrupted run (even `kill -9`)
leaves either the old file or the whole new one under the final name, never a half-written file. Temp names are
`.<name>.<8 random>.tmp`; a folder being replaced is moved aside as `.<name>.old.tmp`; training state folders are
written as `.<name>.partial.tmp`.

Ownership: the writing process holds an advisory lock (`flock`) on each temp file or folder while it writes, and
the kernel drops it when the process ends, however it ends. `clean_stale_temps` (run by every command before it
writes into a folder) removes only temps whose lock is free, so a second sdtool process never deletes the first
one's write in flight; a `.old.tmp` left by a kill between the two renames of a folder swap is put back under its
name when nothing else is there.

Reads: `read_regular_file` opens regular files only (a FIFO would block, `/dev/zero` would never end) and refuses
anything over a size cap, so a sidecar, metadata or config read can neither hang nor exhaust memory.

Write failures the user can fix (disk full, quota, read-only or forbidden folder) become one `SdtoolError` line
naming the path (`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from sdtool.errors import InputError, SdtoolError

try:  # advisory locks: POSIX only; elsewhere nothing is ever judged stale (temps are kept, never wrongly deleted)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
OLD_TAG = "old"
PARTIAL_TAG = "partial"
# `.<name>.<tag>.tmp`: tag is mkstemp's 8 random characters, `old` (a folder moved aside) or `partial` (a state).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[a-z0-9_]{8}|old|partial)\.tmp$")

SIDECAR_LIMIT = 1 << 20  # a caption or tags file: 1 MiB is thousands of times any real one
METADATA_LIMIT = 1 << 30  # a metadata JSON of millions of images stays far below 1 GiB
CONFIG_LIMIT = 16 << 20  # a TOML config or sample-prompt file


# ----------------------------------------------------------------------------------------------- bounded reads
def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file (a symlink to one is fine), or None when it can.

    Raises FileNotFoundError when nothing is there (a dangling symlink included), so callers keep their own wording.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link points back at itself)"
        return f"cannot read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = _kind(mode)
    return f"is {kind}, not a regular file" if kind != "not a regular file" else kind


def read_regular_file(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileNotFoundError when there is none.

    Anything else (a folder, FIFO, device, socket, symlink loop, an unreadable or oversized file) raises InputError
    with the reason, without reading from it: a FIFO would block and a device such as /dev/zero would never end.
    """
    problem = file_problem(path)
    if problem is not None:
        raise InputError(path, problem)
    try:
        # O_NONBLOCK: should a FIFO have replaced the file since the check, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(path, f"is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise InputError(path, f"{what} of {st.st_size:,} bytes is over the limit of {limit:,} bytes")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise InputError(path, f"{what} grew over the limit of {limit:,} bytes while it was read")
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


def read_sidecar_text(path: str | Path) -> str | None:
    """The stripped UTF-8 text of a caption or tags file, None when there is none; InputError with the reason when it
    cannot be used (not a regular file, over SIDECAR_LIMIT, not UTF-8)."""
    try:
        data = read_regular_file(path, SIDECAR_LIMIT, "sidecar")
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


# ----------------------------------------------------------------------------------------------- ownership locks
def _try_lock(fd: int) -> bool | None:
    """Take the exclusive lock on `fd` without waiting: True taken, False held by a live process, None unknown."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts): ownership cannot be told
        return None
    return True


def _open_for_lock(path: str | Path) -> int:
    """An fd to lock a temp file or folder by; symlinks are never followed (a temp of ours is never one)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags)


@contextlib.contextmanager
def owned(path: str | Path) -> Iterator[None]:
    """Hold the ownership lock on an existing temp file or folder that this process is writing."""
    try:
        fd = _open_for_lock(path)
    except OSError:
        yield  # not lockable: it is simply not protected from a cleaner that cannot tell either
        return
    try:
        _try_lock(fd)
        yield
    finally:
        os.close(fd)


def held_by_live_process(path: str | Path) -> bool:
    """Whether a running process holds the ownership lock of a temp file or folder (False when it cannot be told)."""
    try:
        fd = _open_for_lock(path)
    except OSError:
        return False
    try:
        return _try_lock(fd) is False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(folder: str | Path, match: str = "*") -> list[Path]:
    """Remove the temps of interrupted sdtool writes in `folder` (not below it) that no live process owns.

    Only names of the form `.<name>.<tag>.tmp` with `<name>` matching the glob `match` are considered. A
    `.<name>.old.tmp` folder whose `<name>` is gone (a kill between the two renames of a folder swap) is put back
    under `<name>` instead of removed. Returns what was removed or restored.
    """
    folder = Path(folder)
    touched: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return touched
    for entry in entries:
        found = _TEMP_NAME.match(entry.name)
        if found is None or not fnmatch.fnmatchcase(found["name"], match) or entry.is_symlink():
            continue
        try:
            fd = _open_for_lock(entry.path)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live process is writing it, or ownership cannot be told: keep it
            path = Path(entry.path)
            final = folder / found["name"]
            if found["tag"] == OLD_TAG and not os.path.lexists(final):
                os.replace(path, final)
                touched.append(final)
            else:
                _remove(path)
                touched.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return touched


def clean_leftovers_of(path: str | Path) -> list[Path]:
    """`clean_stale_temps` for the one output `path` (its temps, partial and `.old` folders, beside it)."""
    path = Path(path)
    return clean_stale_temps(path.parent, glob.escape(path.name))


def leftover_temp_files(folder: str | Path) -> list[Path]:
    """Temps an interrupted atomic write left behind (for tests and clean-up)."""
    return sorted(p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}"))


# --------------------------------------------------------------------------------------------------- writes
def folder_is_replaceable(path: str | Path, markers: tuple[str, ...]) -> bool:
    """Whether an existing folder may be replaced: it is empty, or holds one of the `markers` files (what sdtool
    writes there, e.g. a diffusers `model_index.json`). A folder of other files is never replaced."""
    path = Path(path)
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return not names or any(name in names for name in markers)


def not_replaceable_error(path: Path, markers: tuple[str, ...]) -> SdtoolError:
    from sdtool.errors import UsageError

    try:
        count = len(os.listdir(path))
    except OSError:
        count = 0
    return UsageError(
        f"{path} is a folder of {count} other files (no {' or '.join(markers)}), not one sdtool wrote; "
        "it is never replaced",
        hint=f"choose a new path (e.g. {path / 'model'}) or remove the folder yourself",
    )


def replace_folder(new: Path, path: Path, markers: tuple[str, ...] | None = None) -> None:
    """Put the folder `new` under the name `path`, replacing a folder there (only when `markers` allow it).

    `os.replace` cannot replace a non-empty folder, so the old one is moved aside (`.<name>.old.tmp`, locked while
    it is there) and removed after; a kill between the two renames is repaired by `clean_stale_temps`.
    """
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(new, path)
        return
    if markers is not None and not folder_is_replaceable(path, markers):
        raise not_replaceable_error(path, markers)
    old = path.with_name(f".{path.name}.{OLD_TAG}{TEMP_SUFFIX}")
    if os.path.lexists(old):
        if held_by_live_process(old):
            raise SdtoolError(f"{path} is being replaced by another sdtool process", hint="wait for it to finish")
        _remove(old)  # debris of an earlier swap: `path` itself is whole
    with owned(path):
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False, replaces: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`, owned by this process; on success it replaces `path`, on error it is
    removed (and a disk-full or read-only failure becomes one `write_error` line).

    `folder=True` yields an empty temp folder (e.g. for a diffusers `save_pretrained`), else a temp file to write.
    An existing folder at `path` is replaced only when it is empty or holds one of `replaces` (see replace_folder).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_temp(path, folder)
    except OSError as exc:
        raise write_error(path, exc) or exc from exc
    _try_lock(fd)
    try:
        yield tmp
        if tmp.is_file():
            _fsync_file(tmp)
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            replace_folder(tmp, path, replaces)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        mapped = write_error(path, exc) if isinstance(exc, Exception) else None  # before the space is freed
        _remove(tmp)
        if mapped is not None:
            raise mapped from exc
        raise
    finally:
        os.close(fd)


def _create_temp(path: Path, folder: bool) -> tuple[Path, int]:
    """A new temp file or folder `.<name>.<8 random>.tmp` beside `path` and an fd to lock it by.

    Made with the default mode (as the final file would be), not mkstemp's private 0600.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            if folder:
                os.mkdir(tmp)
                return tmp, _open_for_lock(tmp)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name", str(path))


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


# ------------------------------------------------------------------------------------------- write failures
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
# Libraries that write through their own I/O report the OS error only in their text: safetensors (Rust) writes
# `Os { code: 28, … }`; torch's zip writer (PytorchStreamWriter, inline_container.cc) says "file write failed" or
# "unexpected pos" after a short write, without the cause.
_CODE_IN_TEXT = re.compile(r"\bOs \{ code: (\d+)")
_TEXT_HINTS = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("File too large", errno.EFBIG),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)
_WRITER_FAILED = ("inline_container.cc", "PytorchStreamWriter", "file write failed")
_NEARLY_FULL = 1 << 20  # bytes: what a disk has left when a write failed for want of space


def _write_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    text = str(exc)
    code = _CODE_IN_TEXT.search(text)
    if code:
        return int(code[1])
    for words, number in _TEXT_HINTS:
        if words in text:
            return number
    return None


def write_error(path: str | Path, exc: BaseException, what: str = "write") -> SdtoolError | None:
    """One line naming `path` and the fix for a write that failed because of the disk or its permissions.

    Call it before removing what the failed write left: a writer that does not say why it failed (torch's) is
    judged by the space left on the disk. None when `exc` is something else (the caller re-raises it as it is).
    """
    if isinstance(exc, SdtoolError):
        return None
    folder = Path(path).parent
    number = _write_errno(exc)
    reason = os.strerror(number) if number is not None else None
    if number is None and any(words in str(exc) for words in _WRITER_FAILED):
        try:
            full = shutil.disk_usage(folder).free < _NEARLY_FULL
        except OSError:
            full = False
        if not full:
            return SdtoolError(
                f"cannot {what} {path}: the write failed ({' '.join(str(exc).split())[:200]})",
                hint=f"check the disk that holds {folder}: is it full, read-only or failing?",
            )
        number, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
    if number in _NO_SPACE:
        return SdtoolError(
            f"cannot {what} {path}: {reason}",
            hint=f"free space on the disk that holds {folder} (or raise the quota), or write elsewhere",
        )
    if number in _NOT_WRITABLE:
        return SdtoolError(
            f"cannot {what} {path}: {reason}",
            hint=f"make {folder} writable, or choose a folder you can write to",
        )
    return None


def os_error(exc: OSError) -> SdtoolError | None:
    """One line for an OSError that names its file (the CLI's last resort before "unexpected …"), or None."""
    if not exc.filename:
        return None
    mapped = write_error(exc.filename, exc)
    if mapped is not None and exc.errno not in (errno.EACCES, errno.EPERM):
        return mapped
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SdtoolError(f"{exc.filename}: {reason}", hint="check the permissions of that path")
    return SdtoolError(f"{exc.filename}: {reason}")


def writable_problem(folder: str | Path) -> str | None:
    """Why files cannot be created in `folder` (or, when it does not exist yet, in its nearest existing parent)."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = os.statvfs(probe).f_flag & os.ST_RDONLY
        except (OSError, AttributeError):
            read_only = 0
        return f"{probe} is on a read-only file system" if read_only else f"{probe} is not writable"
    return None
