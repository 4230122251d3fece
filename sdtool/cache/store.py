"""Finding an image's cache entry in either format and checking it: `load_latents` for training,
`entry_status` / `cache_status` for `sdtool cache --status` (ok / missing / stale with the reason).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.cache.entry import (
    CachedLatents,
    CacheFormat,
    LatentCacheError,
    LoadFormat,
    MissingLatentsError,
    Status,
    data_problem,
    default_cache_dir,
    load_native,
    native_entry_path,
    read_native_entry,
    record_problem,
    tensor_problem,
)
from sdtool.cache.kohya_npz import (
    KohyaSuffix,
    kohya_candidates,
    kohya_npz_path,
    kohya_problem,
    load_kohya,
    read_npz,
)
from sdtool.cache.placement import CacheItem, Placement, plan_items
from sdtool.errors import ImageError, UsageError

if TYPE_CHECKING:
    pass


def load_latents(
    image_path: str | Path,
    bucket: tuple[int, int],
    *,
    cache_dir: str | Path | None = None,
    fmt: LoadFormat = "auto",
    expected_vae: str | None = None,
    allow_stale: bool = False,
    flip_aug: bool = False,
    original_size: tuple[int, int] | None = None,
    resized: tuple[int, int] | None = None,
) -> CachedLatents:
    """Load the cached latents of one image for `bucket` (W, H), checking that they still match.

    `fmt="auto"` tries the native entry in `cache_dir` (when given), then kohya's `_sd.npz`, `_sdxl.npz` and
    legacy `<stem>.npz` beside the image. The latent shape must match the bucket; native entries (and kohya files
    sdtool wrote) must also match the image file (size, mtime, else content hash), `original_size`/`resized` when
    given, and `expected_vae` (a `vae_fingerprint`) when given; foreign kohya files must not be older than the
    image. `flip_aug=True` requires flipped latents.
    Raises MissingLatentsError / StaleLatentsError (unless `allow_stale`, which only keeps the shape check).
    """
    if fmt not in ("auto", "sdtool", "kohya"):
        raise UsageError(f"unknown latent cache format {fmt!r}", hint="use auto, sdtool or kohya")
    image_path = Path(image_path)
    bucket = (int(bucket[0]), int(bucket[1]))
    placement = None
    if original_size is not None:
        original_size = (int(original_size[0]), int(original_size[1]))
        if resized is not None:
            from sdtool.cache.pixels import crop_ltrb

            resized = (int(resized[0]), int(resized[1]))
            placement = Placement(original_size, bucket, resized, crop_ltrb(resized, bucket))
    looked: list[str] = []
    if fmt in ("auto", "sdtool"):
        if cache_dir is not None:
            native = native_entry_path(image_path, cache_dir)
            if native.is_file():
                return load_native(native, image_path, bucket, placement, expected_vae, allow_stale, flip_aug)
            looked.append(str(native))
        elif fmt == "sdtool":
            raise UsageError("loading sdtool-format latents needs the cache folder (cache_dir)")
    if fmt in ("auto", "kohya"):
        if original_size is None:
            from sdtool.images import read_size

            try:
                original_size = read_size(image_path)
            except ImageError as exc:
                raise MissingLatentsError(image_path, f"cannot find kohya latents: {exc.reason}") from None
        found = load_kohya(image_path, bucket, original_size, placement, expected_vae, allow_stale, flip_aug)
        if found is not None:
            return found
        looked += [str(p) for p in kohya_candidates(image_path, original_size)]
    raise MissingLatentsError(image_path, "no cached latents (looked for " + ", ".join(looked) + ")")


@dataclass
class EntryStatus:
    """One image's cache state: `status` ok | missing | stale, with a `reason` for the latter two."""

    key: str
    image_path: Path
    status: Status
    reason: str = ""
    cache_path: Path | None = None
    placement: Placement | None = None

    def to_json(self) -> dict[str, Any]:
        """The `--status --json` object: path, status, reason (and the cache file)."""
        return {
            "path": str(self.image_path),
            "status": self.status,
            "reason": self.reason,
            "latents": str(self.cache_path) if self.cache_path is not None else None,
        }


def entry_status(
    item: CacheItem,
    *,
    fmt: CacheFormat = "sdtool",
    cache_dir: str | Path | None = None,
    vae: str | None = None,
    flip_aug: bool = False,
    interpolation: str | None = "lanczos",
    precision: str | None = None,
    kohya_suffix: KohyaSuffix = "_sd.npz",
) -> EntryStatus:
    """The cache state of one planned image: headers and records first (the image is hashed only if its mtime
    changed), then the latents themselves (small) for NaN/inf."""
    p = item.placement
    if fmt == "sdtool":
        if cache_dir is None:
            raise UsageError("the sdtool cache format needs a cache folder")
        path = native_entry_path(item.image_path, cache_dir)
        if not path.is_file():
            return EntryStatus(item.key, item.image_path, "missing", "not cached yet", path, p)
        try:
            header, record = read_native_entry(path)
        except LatentCacheError as exc:
            return EntryStatus(item.key, item.image_path, "stale", exc.reason, path, p)
        problem = record_problem(
            record,
            item.image_path,
            bucket=p.bucket,
            placement=p,
            vae=vae,
            flip_aug=flip_aug,
            interpolation=interpolation,
            precision=precision,
        ) or tensor_problem(header, p.bucket, flip_aug)
        if problem is None:
            damage = data_problem(path)  # last: the only check that reads the latents themselves
            problem = ("stale", damage) if damage is not None else None
    else:
        path = kohya_npz_path(item.image_path, p.original_size, kohya_suffix)
        if not path.is_file():
            return EntryStatus(item.key, item.image_path, "missing", "not cached yet", path, p)
        try:
            npz = read_npz(path, item.image_path)
        except LatentCacheError as exc:
            return EntryStatus(item.key, item.image_path, "stale", exc.reason, path, p)
        problem = kohya_problem(
            npz, item.image_path, p.bucket, p.original_size, p, vae, flip_aug, interpolation, precision
        )
    if problem is None:
        return EntryStatus(item.key, item.image_path, "ok", "", path, p)
    return EntryStatus(item.key, item.image_path, problem[0], problem[1], path, p)


def cache_status(
    metadata_path: str | Path,
    *,
    image_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    fmt: CacheFormat = "sdtool",
    vae: str | None = None,
    flip_aug: bool = False,
    interpolation: str | None = "lanczos",
    precision: str | None = None,
    kohya_suffix: KohyaSuffix = "_sd.npz",
) -> list[EntryStatus]:
    """ok / missing / stale for every image of a metadata file, without encoding anything or loading a model.

    `cache_dir` defaults to `default_cache_dir(metadata_path)`; `vae` is a `vae_fingerprint` (None: the VAE is
    not compared); `interpolation`/`precision` None accept any. Entries whose image cannot be found or read come
    back as missing with the reason. Raises MissingBucketError for metadata without `train_resolution`.
    """
    items, problems = plan_items(metadata_path, image_dir)
    if cache_dir is None:
        cache_dir = default_cache_dir(metadata_path)
    statuses = [EntryStatus(path, Path(path), "missing", reason) for path, reason in problems]
    statuses += [
        entry_status(
            item,
            fmt=fmt,
            cache_dir=cache_dir,
            vae=vae,
            flip_aug=flip_aug,
            interpolation=interpolation,
            precision=precision,
            kohya_suffix=kohya_suffix,
        )
        for item in items
    ]
    return statuses


def count_statuses(statuses: Iterable[EntryStatus]) -> dict[str, int]:
    """{"ok": n, "missing": n, "stale": n}."""
    counts = {"ok": 0, "missing": 0, "stale": 0}
    for s in statuses:
        counts[s.status] += 1
    return counts
