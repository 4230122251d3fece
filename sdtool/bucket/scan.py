"""The work behind `sdtool bucket`: header-only sizes read in parallel, bucket assignment, sidecars, metadata entries.

Sizes come from image headers (`images.read_size`, EXIF-aware) in a thread pool, so a folder of thousands of images
is bucketed in seconds instead of decoding every image as kohya's preparation script does. Nothing here prints:
the CLI reports skips, progress and the per-bucket summary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.bucket.algorithm import BucketAssignment, BucketError, BucketSettings, Size, select_bucket
from sdtool.errors import ImageError, InputError
from sdtool.fsutil import read_sidecar_text
from sdtool.images import read_size
from sdtool.metadata import ImageResolver, Metadata, merge_metadata
from sdtool.runtime import usable_cpus

BUCKET_FIELDS = ("image_size", "train_resolution", "resized_size", "crop_ltrb", "bucket_settings")


@dataclass(frozen=True)
class BucketedImage:
    """One image with its bucket and the caption/tags read from its sidecars (None: no sidecar)."""

    path: Path
    assignment: BucketAssignment
    caption: str | None = None
    tags: str | None = None


@dataclass
class ScanResult:
    """Bucketed images in listing order, skipped images and sidecars that could not be read, each with a reason."""

    images: list[BucketedImage] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    sidecar_problems: list[tuple[Path, str]] = field(default_factory=list)


def sidecar_path(image: str | Path, extension: str) -> str:
    """`<image without its extension><extension>`, as kohya's writers name sidecars (`a.b.png` → `a.b.caption`)."""
    # String maths, not Path.with_name: this runs twice per image and pathlib parsing showed up in profiles.
    return os.path.splitext(image)[0] + extension


def _bucket_one(
    path: Path, settings: BucketSettings, caption_ext: str | None, tags_ext: str | None
) -> tuple[BucketedImage | None, str | None, list[tuple[Path, str]]]:
    try:
        width, height = read_size(path)
        assignment = select_bucket(width, height, settings)
    except ImageError as exc:
        return None, exc.reason, []
    except BucketError as exc:
        return None, str(exc), []
    texts: dict[str, str | None] = {"caption": None, "tags": None}
    problems: list[tuple[Path, str]] = []
    for name, ext in (("caption", caption_ext), ("tags", tags_ext)):
        if ext is None:
            continue
        try:
            texts[name] = read_sidecar_text(sidecar_path(path, ext))
        except InputError as exc:
            problems.append((exc.path, f"{exc.reason}; the image is kept without its {name}"))
    return BucketedImage(path, assignment, texts["caption"], texts["tags"]), None, problems


def default_workers() -> int:
    """One header reader per CPU core.

    Header parsing holds the GIL, so with warm files more threads than cores only contend; on slow or network
    disks, where reads wait on I/O, a larger `--workers` pays off.
    """
    return usable_cpus()


def bucket_images(
    paths: Sequence[Path],
    settings: BucketSettings,
    *,
    caption_extension: str | None = ".caption",
    tags_extension: str | None = ".txt",
    workers: int | None = None,
    on_done: Callable[[int], Any] | None = None,
) -> ScanResult:
    """Read each image's displayed size from its header, assign its bucket and read its sidecars, in parallel.

    `workers` 0 or 1 reads in the calling thread. `on_done(n)` is called as images finish (for a progress bar).
    """
    n_workers = default_workers() if workers is None else workers
    result = ScanResult()

    def work(path: Path) -> tuple[BucketedImage | None, str | None, list[tuple[Path, str]]]:
        outcome = _bucket_one(path, settings, caption_extension, tags_extension)
        if on_done is not None:
            on_done(1)
        return outcome

    if n_workers <= 1 or len(paths) <= 1:
        collected = [work(path) for path in paths]
    else:
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="sdtool-bucket")
        try:
            collected = list(pool.map(work, paths))  # map keeps the listing order
        except BaseException:
            # Ctrl-C: drop the queued reads instead of finishing a folder of 100,000 images first.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    for path, (image, reason, problems) in zip(paths, collected, strict=True):
        if image is None:
            result.skipped.append((path, reason or "unreadable"))
        else:
            result.images.append(image)
        result.sidecar_problems.extend(problems)
    return result


def metadata_fields(image: BucketedImage, settings: BucketSettings) -> dict[str, Any]:
    """The metadata entry for one image: sidecar texts (when present), sizes, bucket, resize, crop and settings."""
    a = image.assignment
    fields: dict[str, Any] = {}
    if image.caption is not None:
        fields["caption"] = image.caption
    if image.tags is not None:
        fields["tags"] = image.tags
    fields["image_size"] = list(a.size)
    fields["train_resolution"] = list(a.bucket)
    fields["resized_size"] = list(a.resized)
    fields["crop_ltrb"] = list(a.crop)
    fields["bucket_settings"] = settings.as_dict()
    return fields


def image_record(image: BucketedImage, key: str) -> dict[str, Any]:
    """The `--json` object for one image."""
    a = image.assignment
    return {
        "path": str(image.path),
        "key": key,
        "size": list(a.size),
        "bucket": list(a.bucket),
        "resized": list(a.resized),
        "crop": list(a.crop),
        "upscaled": a.upscaled,
        "scale": round(a.scale, 6),
        "aspect_error": round(a.aspect_error, 6),
    }


def _same_file_key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def merge_rekeyed(
    existing: Mapping[str, Mapping[str, Any]],
    updates: Mapping[str, Mapping[str, Any]],
    paths: Mapping[str, Path],
    image_dir: Path | None,
) -> tuple[Metadata, int]:
    """Merge `updates` into `existing`, moving an existing entry to the new key when it names the same image.

    An old entry may use another key form (absolute, relative to `image_dir`, or kohya's bare stem); without this it
    would stay beside the new one and the image would train twice. Keys that do not resolve are kept as they are.
    Returns the merged metadata and how many entries were re-keyed.
    """
    resolver = ImageResolver(image_dir)
    existing_by_file: dict[str, str] = {}
    for key in existing:
        if key in updates:
            continue
        try:
            existing_by_file.setdefault(_same_file_key(resolver.resolve(key)), key)
        except InputError:
            continue
    renamed: dict[str, str] = {}
    for key, path in paths.items():
        if key in existing:
            continue
        old = existing_by_file.get(_same_file_key(path))
        if old is not None and old not in renamed:
            renamed[old] = key
    base: Metadata = {}
    for key, fields in existing.items():
        new_key = renamed.get(key, key)
        base.setdefault(new_key, {}).update(fields)
    return merge_metadata(base, updates), len(renamed)


@dataclass
class BucketStats:
    """One row of the summary table."""

    bucket: Size
    count: int = 0
    abs_aspect_error_sum: float = 0.0
    upscaled: int = 0
    max_upscale: float = 1.0

    @property
    def mean_aspect_error(self) -> float:
        return self.abs_aspect_error_sum / self.count if self.count else 0.0


def bucket_stats(images: Iterable[BucketedImage]) -> list[BucketStats]:
    """Per-bucket count, mean |aspect error|, upscaled count and largest upscale factor, sorted by bucket."""
    stats: dict[Size, BucketStats] = {}
    for image in images:
        a = image.assignment
        row = stats.setdefault(a.bucket, BucketStats(a.bucket))
        row.count += 1
        row.abs_aspect_error_sum += abs(a.aspect_error)
        if a.upscaled:
            row.upscaled += 1
            row.max_upscale = max(row.max_upscale, a.scale)
    return [stats[b] for b in sorted(stats)]
