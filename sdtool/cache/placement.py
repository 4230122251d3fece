"""Where an image lands in its bucket, and the list of images a metadata file asks to cache (CONTRACT §F).

`placement_from_entry` turns a bucketed metadata entry into a `Placement` (original size, bucket, resized size,
centre crop, all [W, H]); `plan_items` resolves every entry of a metadata file to its image and placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    try:
        items = tuple(int(v) for v in value)
        if len(items) != n or any(float(v) != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(where, f"metadata field {name} must be {n} integers, got {value!r}") from None
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


def placement_from_entry(fields: Mapping[str, Any], image_path: str | Path | None = None) -> Placement:
    """The Placement a metadata entry describes; `image_size` missing → read from the image header (and a bucket
    made from a rotated photo's stored pixels turned upright, see `displayed_bucket`).

    Raises MissingBucketError without `train_resolution`, InputError for malformed fields, ImageError when the
    header has to be read and cannot be.
    """
    from sdtool.bucket.algorithm import cover_resize
    from sdtool.cache.pixels import crop_ltrb

    where = image_path if image_path is not None else "metadata entry"
    if fields.get("train_resolution") is None:
        raise MissingBucketError(f"{where}: no train_resolution in the metadata", hint="run sdtool bucket first")
    bw, bh = _int_tuple(fields["train_resolution"], 2, "train_resolution", where)
    if bw <= 0 or bh <= 0 or bw % 8 or bh % 8:
        raise InputError(where, f"bucket {bw}x{bh} is not a positive multiple of 8")
    if fields.get("image_size") is not None:
        w, h = _int_tuple(fields["image_size"], 2, "image_size", where)
    elif image_path is not None:
        (bw, bh), (w, h) = displayed_bucket(image_path, (bw, bh))
    else:
        raise InputError(where, "no image_size in the metadata and no image to read it from")
    if fields.get("resized_size") is not None:
        rw, rh = _int_tuple(fields["resized_size"], 2, "resized_size", where)
    else:
        (rw, rh), _ = cover_resize((w, h), (bw, bh))
    try:
        centre = crop_ltrb((rw, rh), (bw, bh))
    except ValueError as exc:
        raise InputError(where, str(exc), hint="run sdtool bucket again") from None
    if fields.get("crop_ltrb") is not None:
        crop = _int_tuple(fields["crop_ltrb"], 4, "crop_ltrb", where)
        if crop != centre:
            raise InputError(where, f"crop_ltrb {list(crop)} is not the centre crop {list(centre)} of the bucket")
    return Placement((w, h), (bw, bh), (rw, rh), centre)


@dataclass(frozen=True)
class CacheItem:
    """One image of a metadata file, ready to encode or check."""

    key: str
    image_path: Path
    placement: Placement


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
    from sdtool.metadata import ImageResolver, read_metadata

    metadata_path = Path(metadata_path)
    metadata = read_metadata(metadata_path)
    require_buckets(metadata, metadata_path)
    resolver = ImageResolver(Path(image_dir) if image_dir is not None else metadata_path.absolute().parent)
    items: list[CacheItem] = []
    problems: list[tuple[str, str]] = []
    for key, fields in metadata.items():
        try:
            image = resolver.resolve(key)
            if not image.is_file():
                problems.append((str(image), "image file not found"))
                continue
            items.append(CacheItem(key, image, placement_from_entry(fields, image)))
        except InputError as exc:
            problems.append((str(exc.path), exc.reason))
    return items, problems
