"""Parallel image reading for the labelling commands, and the sidecar plan (which files to write, which to keep).

Images are decoded with `sdtool.images.open_image` (CONTRACT §C) and preprocessed inside torch DataLoader workers,
so that decoding overlaps with inference. A file that cannot be read comes back as a failure with its reason
instead of stopping the batch.
"""

from __future__ import annotations

import glob
import unicodedata
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.console import SkipReporter
from sdtool.errors import ImageError, UsageError
from sdtool.fsutil import atomic_write_text, clean_stale_temps, file_problem
from sdtool.images import check_sidecar_extension, open_image
from sdtool.runtime import usable_cpus

Preprocess = Callable[[Any], Any]
Stack = Callable[[list[Any]], Any]


@dataclass
class LoadedBatch:
    """One batch as the workers delivered it: the images that loaded (positions, sizes, collated data) and failures."""

    indices: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    data: Any = None
    failures: list[tuple[int, str]] = field(default_factory=list)


class _ImageDataset:
    """Map-style dataset: position → (position, displayed size, preprocessed image) or (position, reason)."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, tuple[int, int] | None, Any, str | None]:
        path = self.paths[index]
        try:
            image = open_image(path)
            return index, image.size, self.preprocess(image), None
        except ImageError as exc:
            return index, None, None, exc.reason
        except Exception as exc:  # one odd image that the model's preprocessing rejects must not end the run
            return index, None, None, f"cannot preprocess: {type(exc).__name__}: {exc}"


class _Collate:
    """Collates inside the worker, so the main process receives ready batches (picklable for spawn contexts)."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def __call__(self, items: list[tuple[int, tuple[int, int] | None, Any, str | None]]) -> LoadedBatch:
        batch = LoadedBatch()
        good = []
        for index, size, data, reason in items:
            if reason is not None or size is None:
                batch.failures.append((index, reason or "unreadable"))
            else:
                batch.indices.append(index)
                batch.sizes.append(size)
                good.append(data)
        batch.data = self.stack(good) if good else None
        return batch


def default_workers(workers: int | None) -> int:
    """`--workers` default: one image reader per CPU core."""
    if workers is not None:
        return workers
    return usable_cpus()


def iter_batches(
    paths: Sequence[Path], preprocess: Preprocess, stack: Stack, batch_size: int, workers: int | None
) -> Iterator[LoadedBatch]:
    """Yield batches of preprocessed images in path order; `workers=0` reads in the main process."""
    import torch
    from torch.utils.data import DataLoader

    n_workers = min(default_workers(workers), max(1, len(paths)))
    if workers == 0:
        n_workers = 0
    with warnings.catch_warnings():
        # torch warns when the workers outnumber the usable cores; the default never does (one per core), so only an
        # explicit --workers can, and that is the user's choice (image decoding also waits on the disk).
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader: DataLoader[Any] = DataLoader(
            _ImageDataset(paths, preprocess),  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            num_workers=n_workers,
            collate_fn=_Collate(stack),
            prefetch_factor=4 if n_workers else None,
            # A private generator: creating the worker iterator must not consume the global RNG, so --seed gives
            # the same captions with any --workers value.
            generator=torch.Generator(),
        )
        batches = iter(loader)  # the workers start here (torch checks their number again)
    yield from batches


def check_extension(extension: str, flag: str) -> str:
    """A sidecar extension must look like `.txt`: a leading dot, no folder separators, not an image extension."""
    if len(extension) < 2 or not extension.startswith(".") or "/" in extension or "\\" in extension:
        raise UsageError(f"{flag} {extension!r}: expected an extension with a leading dot, such as .txt")
    check_sidecar_extension(extension, flag)
    return extension


def sidecar_path(image: Path, extension: str) -> Path:
    """`<folder>/<stem><extension>` (kohya's naming: the image's last suffix is replaced)."""
    return image.with_name(image.stem + extension)


def sidecar_targets(images: Sequence[Path], extension: str, skips: SkipReporter) -> list[tuple[Path, Path]]:
    """Pair each image with its sidecar; an image whose sidecar belongs to an earlier image (a.png, a.jpg) is skipped,
    and so is one whose sidecar path holds something that is not a file (a folder, a FIFO).

    Writing both would silently overwrite one label with the other. Temp files a killed run left beside the images
    are removed first (those of a live run are kept, see sdtool.fsutil).
    """
    for folder in sorted({image.parent for image in images}):
        clean_stale_temps(folder, f"*{glob.escape(extension)}")
    owner: dict[Path, Path] = {}
    pairs = []
    for image in images:
        target = sidecar_path(image, extension)
        first = owner.setdefault(target, image)
        if first != image:
            skips.skip(image, f"its sidecar {target.name} also belongs to {first.name}; rename one of them")
            continue
        try:
            problem = file_problem(target)
        except FileNotFoundError:
            problem = None  # no sidecar yet (a dangling symlink there is replaced by the new file)
        if problem is not None:
            # A folder or FIFO where the sidecar goes: it is neither an existing label nor something to replace.
            skips.skip(image, f"its sidecar {target.name} {problem}; remove or rename it")
            continue
        pairs.append((image, target))
    return pairs


def one_line(text: str) -> str:
    """A sidecar holds one line (kohya reads the first): line breaks, other control characters (a tab excepted) and
    line or paragraph separators become spaces; the ends are stripped, the rest (separators included) kept."""
    return "".join(" " if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text).strip()


class SidecarWriter:
    """Atomic sidecar writes on background threads, so fsync waits overlap with inference.

    Completion callbacks (printing the written path) run in the caller's thread, in submission order; a failed
    write is raised from `write` or `close`. Used as a context manager, pending writes are finished on exit.
    """

    def __init__(self, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdtool-write")
        self._pending: deque[tuple[Future[Any], Callable[[], None]]] = deque()

    def write(self, path: Path, text: str, on_done: Callable[[], None]) -> None:
        """Queue `text` for `path` as one line (see `one_line`); `on_done` runs once it is on disk."""
        self._pending.append((self._pool.submit(atomic_write_text, path, one_line(text) + "\n"), on_done))
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][0].done()):
            future, on_done = self._pending.popleft()
            future.result()
            on_done()

    def close(self) -> None:
        """Wait for every queued write and run the remaining callbacks."""
        try:
            self._reap(block=True)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: let queued writes land (each is atomic), report the original error
            self._pool.shutdown(wait=True)
