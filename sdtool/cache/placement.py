"""Where an image lands in its bucket, and the list of images a metadata file asks to cache (CONTRACT §F).

`placement_from_entry` turns a bucketed metadata entry into a `Placement` (original size, bucket, resized size,
centre crop, all [W, H]); `plan_items` resolves every entry of a metadata file to its image and placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.bucket.algorithm import crop_ltrb
from sdtool.errors import InputError, UsageError

if TYPE_CHECKING:
    pass


class MissingBucketError(UsageError):
    """Metadata without `train_resolution`: the images were not bucketed yet (exit 2)."""


@dataclass(frozen=True)
class Placement:
    """Where an image lands in its bucket: original size, bucket, resized size and centre crop (all [W, H] order)."""

    original_size: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(4, h/8, w/8) for this bucket."""
        return latent_shape(self.bucket)


def latent_shape(bucket: tuple[int, int]) -> tuple[int, int, int]:
    """The (C, h/8, w/8) shape of SD 1/2 latents for a bucket (W, H)."""
    return (4, int(bucket[1]) // 8, int(bucket[0]) // 8)


def _int_tuple(value: Any, n: int, name: str, where: str | Path) -> tuple[int, ...]:
    from sdtool.metadata import whole_numbers

    items = whole_numbers(value, n)
    if items is None:
        raise InputError(where, f"metadata field {name} must be {n} integers, got {value!r}")
    return items


def displayed_bucket(image_path: str | Path, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, displayed size) for a metadata entry without `image_size`, as kohya's tools write them.

    Such a bucket may have been computed from the stored pixel grid of a photo that EXIF orientation turns by 90°
    (kohya never applies it); it is then turned to fit the displayed image (`bucket_for_displayed`), with a warning
    naming the file. Raises ImageError when the header cannot be read.
    """
    from sdtool.bucket.algorithm import bucket_for_displayed
    from sdtool.console import warn
    from sdtool.images import read_sizes

    stored, displayed = read_sizes(image_path)
    turned = bucket_for_displayed(bucket, stored, displayed)
    if turned != bucket:
        warn(
            f"{image_path}: the metadata's bucket {size_text(bucket)} fits the stored {size_text(stored)} pixels, "
            f"but EXIF orientation shows the image as {size_text(displayed)}; using the bucket {size_text(turned)} "
            "(the metadata has no image_size, as kohya's tools, which ignore EXIF orientation, write it; "
            "run sdtool bucket to re-bucket it)"
        )
    return turned, displayed


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def placement_problem(
    image_size: tuple[int, int] | None,
    bucket: tuple[int, int],
    resized: tuple[int, int] | None,
    crop: tuple[int, int, int, int] | None = None,
) -> str | None:
    """Why a placement from the metadata cannot be used, or None. The one check `cache` and training share.

    The bucket is a positive multiple of 8 (latents are 1/8 of it); `resized` covers it with one side less than twice
    the bucket's (what a cover resize, or `--no-upscale`'s rounding, gives); neither holds more pixels than
    SDTOOL_MAX_PIXELS, the limit for images (a `resized_size` of 60000² would allocate gigabytes); a `crop_ltrb`
    is the centre crop. `image_size` (when known) is a real size. `resized` None checks the sizes alone (before a
    resize is computed from them).
    """
    from sdtool.images import max_pixels

    bw, bh = bucket
    if bw <= 0 or bh <= 0 or bw % 8 or bh % 8:
        return f"bucket {bw}x{bh} is not a positive multiple of 8; run sdtool bucket again"
    if image_size is not None and (image_size[0] <= 0 or image_size[1] <= 0):
        return f"image_size {image_size[0]}x{image_size[1]} is not a real size; run sdtool bucket again"
    limit = max_pixels()
    for what, size in (("bucket", bucket), ("resized size", resized)):
        if size is not None and size[0] * size[1] > limit:
            return f"{what} {size[0]}x{size[1]} is over the limit of {limit:,} pixels (SDTOOL_MAX_PIXELS)"
    if resized is None:
        return None
    rw, rh = resized
    if rw < bw or rh < bh:
        return f"resized size {rw}x{rh} does not cover the bucket {bw}x{bh}; run sdtool bucket again"
    if rw >= 2 * bw and rh >= 2 * bh:
        return f"resized size {rw}x{rh} is far larger than its bucket {bw}x{bh} needs; run sdtool bucket again"
    if crop is not None:
        centre = crop_ltrb(resized, bucket)
        if tuple(crop) != centre:
            return f"crop_ltrb {list(crop)} is not the centre crop {list(centre)}; run sdtool bucket again"
    return None


def placement_from_entry(fields: Mapping[str, Any], image_path: str | Path | None = None) -> Placement:
    """The Placement a metadata entry describes; `image_size` missing → read from the image header (and a bucket
    made from a rotated photo's stored pixels turned upright, see `displayed_bucket`).

    Raises MissingBucketError without `train_resolution`, InputError for malformed fields (`placement_problem`),
    ImageError when the header has to be read and cannot be.
    """
    from sdtool.bucket.algorithm import cover_resize
    from sdtool.cache.pixels import crop_ltrb

    where = image_path if image_path is not None else "metadata entry"
    if fields.get("train_resolution") is None:
        raise MissingBucketError(f"{where}: no train_resolution in the metadata", hint="run sdtool bucket first")
    bw, bh = _int_tuple(fields["train_resolution"], 2, "train_resolution", where)
    if fields.get("image_size") is not None:
        w, h = _int_tuple(fields["image_size"], 2, "image_size", where)
    elif image_path is not None:
        (bw, bh), (w, h) = displayed_bucket(image_path, (bw, bh))
    else:
        raise InputError(where, "no image_size in the metadata and no image to read it from")
    problem = placement_problem((w, h), (bw, bh), None)  # before a resize is computed from them
    if problem is not None:
        raise InputError(where, problem)
    if fields.get("resized_size") is not None:
        rw, rh = _int_tuple(fields["resized_size"], 2, "resized_size", where)
    else:
        (rw, rh), _ = cover_resize((w, h), (bw, bh))
    crop = _int_tuple(fields["crop_ltrb"], 4, "crop_ltrb", where) if fields.get("crop_ltrb") is not None else None
    problem = placement_problem((w, h), (bw, bh), (rw, rh), crop)  # type: ignore[arg-type]
    if problem is not None:
        raise InputError(where, problem)
    return Placement((w, h), (bw, bh), (rw, rh), crop_ltrb((rw, rh), (bw, bh)))


@dataclass(frozen=True)
class CacheItem:
    """One image of a metadata file, ready to encode or check."""

    key: str
    image_path: Path
    placement: Placement


def image_file_problem(path: Path) -> str | None:
    """Why the image a metadata key names cannot be read as a file (missing, a FIFO …), or None."""
    from sdtool.fsutil import file_problem

    try:
        return file_problem(path)
    except FileNotFoundError:
        return "image file not found"


def require_buckets(metadata: Mapping[str, Mapping[str, Any]], metadata_path: str | Path) -> None:
    """Refuse metadata whose entries lack `train_resolution` (exit 2: run sdtool bucket first)."""
    if not metadata:
        raise InputError(metadata_path, "the metadata has no images")
    unbucketed = [key for key, fields in metadata.items() if fields.get("train_resolution") is None]
    if unbucketed:
        some = unbucketed[0] if len(unbucketed) == 1 else f"{unbucketed[0]} and {len(unbucketed) - 1} more"
        raise MissingBucketError(
            f"{metadata_path}: {len(unbucketed)} of {len(metadata)} entries have no train_resolution ({some})",
            hint=f"run sdtool bucket first (sdtool bucket DIR --output {metadata_path})",
        )


def plan_items(
    metadata_path: str | Path, image_dir: str | Path | None = None
) -> tuple[list[CacheItem], list[tuple[str, str]]]:
    """Resolve every entry of a bucketed metadata file to (image, placement); unusable entries come back as
    (path or key, reason) pairs. Relative keys resolve against `image_dir`, by default the metadata's folder."""
    from sdtool.metadata import ImageResolver, entry_problem, read_metadata

    metadata_path = Path(metadata_path)
    metadata = read_metadata(metadata_path)
    require_buckets(metadata, metadata_path)
    resolver = ImageResolver(Path(image_dir) if image_dir is not None else metadata_path.absolute().parent)
    items: list[CacheItem] = []
    problems: list[tuple[str, str]] = []
    for key, fields in metadata.items():
        try:
            image = resolver.resolve(key)
            problem = image_file_problem(image) or entry_problem(fields)
            if problem is not None:
                problems.append((str(image), problem))
                continue
            items.append(CacheItem(key, image, placement_from_entry(fields, image)))
        except InputError as exc:
            problems.append((str(exc.path), exc.reason))
    return items, problems
