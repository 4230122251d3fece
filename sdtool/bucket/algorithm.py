"""Aspect-ratio buckets, exactly as kohya's sd-scripts computes them (CONTRACT §E), in pure Python.

The bucket set and the image-to-bucket assignment must match kohya's `make_bucket_resolutions` and
`BucketManager.select_bucket` bit for bit (same float arithmetic, same `int(x + 0.5)` rounding, same tie-breaking),
so that a dataset bucketed by sdtool trains into the same buckets as under kohya. What kohya gets wrong around it
(silently capped buckets, buckets outside min/max with `no_upscale`, a crash on tiny images) is reported here
instead of hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

Size = tuple[int, int]


class BucketError(ValueError):
    """An image that cannot be given a bucket (e.g. smaller than one bucket step with `no_upscale`)."""


def parse_resolution(text: str) -> Size:
    """`"512"` → (512, 512), `"768,512"` → (768, 512); raises ValueError for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected a number or W,H (e.g. 512 or 768,512), got {text!r}")
    values = [int(p) for p in parts]
    if any(v <= 0 for v in values):
        raise ValueError(f"resolution sides must be positive, got {text!r}")
    return (values[0], values[-1])


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya's bucket list: the square of the max area, then (w, h) and (h, w) for w = min_size … max_size."""
    max_width, max_height = max_reso
    max_area = max_width * max_height

    resos: set[Size] = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))

    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    """kohya's `round_to_steps`: round half up to an integer, then down to a multiple of `steps`."""
    x = int(x + 0.5)
    return x - x % steps


def crop_ltrb(resized: Size, bucket: Size) -> tuple[int, int, int, int]:
    """The centre crop of a `resized` image to `bucket` as (left, top, right, bottom)."""
    rw, rh = resized
    bw, bh = bucket
    if rw < bw or rh < bh:
        raise ValueError(f"resized size {rw}x{rh} does not cover the bucket {bw}x{bh}")
    left = (rw - bw) // 2
    top = (rh - bh) // 2
    return left, top, left + bw, top + bh


@dataclass(frozen=True)
class BucketSettings:
    """The bucket parameters: max area from `resolution`, side limits and step, and whether to upscale."""

    resolution: Size = (512, 512)
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    @cached_property
    def resolutions(self) -> list[Size]:
        """The predefined buckets (used unless `no_upscale`, which makes buckets per image)."""
        return make_bucket_resolutions(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        )

    @cached_property
    def _lookup(self) -> tuple[frozenset[Size], list[float]]:
        return frozenset(self.resolutions), [w / h for w, h in self.resolutions]

    def as_dict(self) -> dict[str, object]:
        """The settings under kohya's argument names (recorded in each metadata entry)."""
        return {
            "resolution": list(self.resolution),
            "min_bucket_reso": self.min_bucket_reso,
            "max_bucket_reso": self.max_bucket_reso,
            "bucket_reso_steps": self.bucket_reso_steps,
            "bucket_no_upscale": self.no_upscale,
        }


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: resize to `resized`, then centre-crop `crop` (l, t, r, b) out of it to `bucket`."""

    size: Size
    bucket: Size
    resized: Size
    crop: tuple[int, int, int, int] = field(init=False)
    scale: float = 1.0
    aspect_error: float = 0.0  # bucket aspect − image aspect, kohya's `ar_error`

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop", crop_ltrb(self.resized, self.bucket))

    @property
    def upscaled(self) -> bool:
        return self.resized[0] > self.size[0] or self.resized[1] > self.size[1]


def select_bucket(width: int, height: int, settings: BucketSettings) -> BucketAssignment:
    """Assign an image of `width`×`height` (displayed size) to a bucket, as kohya's `select_bucket` does."""
    if width <= 0 or height <= 0:
        raise BucketError(f"invalid image size {width}x{height}")
    if settings.no_upscale:
        return _select_no_upscale(width, height, settings)

    aspect_ratio = width / height
    resos_set, ratios = settings._lookup
    reso = (width, height)
    if reso not in resos_set:
        # min() keeps the first of equal errors, like numpy's argmin in kohya.
        best = min(range(len(ratios)), key=lambda i: abs(ratios[i] - aspect_ratio))
        reso = settings.resolutions[best]

    bw, bh = reso
    resized, scale = cover_resize((width, height), reso)
    return BucketAssignment((width, height), reso, resized, scale=scale, aspect_error=bw / bh - aspect_ratio)


def cover_resize(size: Size, bucket: Size) -> tuple[Size, float]:
    """The size that covers `bucket` (CONTRACT §E) and its scale: match the height for images wider than the
    bucket, else the width; sides rounded with `int(x + 0.5)`."""
    width, height = size
    bw, bh = bucket
    scale = bh / height if width / height > bw / bh else bw / width
    return (int(width * scale + 0.5), int(height * scale + 0.5)), scale


def _select_no_upscale(width: int, height: int, settings: BucketSettings) -> BucketAssignment:
    steps = settings.bucket_reso_steps
    aspect_ratio = width / height
    max_area = settings.max_area
    scale = 1.0
    if width * height > max_area:
        # Shrink to the max area keeping the aspect, then make the long or short side a multiple of the step,
        # whichever keeps the aspect closer.
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        scale = resized_width / width

        b_width_rounded = round_to_steps(resized_width, steps)
        b_height_in_wr = round_to_steps(b_width_rounded / aspect_ratio, steps)
        ar_width_rounded = b_width_rounded / b_height_in_wr if b_height_in_wr else math.inf

        b_height_rounded = round_to_steps(resized_height, steps)
        b_width_in_hr = round_to_steps(b_height_rounded * aspect_ratio, steps)
        ar_height_rounded = b_width_in_hr / b_height_rounded if b_height_rounded else math.inf

        # kohya: strictly smaller error for the width candidate, otherwise (ties included) the height one.
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            resized = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
        else:
            resized = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
    else:
        resized = (width, height)

    # The bucket is the largest step multiple inside the resized image: crop, never pad.
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if bucket[0] == 0 or bucket[1] == 0:
        raise BucketError(
            f"image {width}x{height} would need a bucket side under {steps} px without upscaling "
            f"(resized {resized[0]}x{resized[1]}); drop --no-upscale or remove the image"
        )
    return BucketAssignment(
        (width, height), bucket, resized, scale=scale, aspect_error=bucket[0] / bucket[1] - aspect_ratio
    )


def capped_buckets(settings: BucketSettings) -> list[Size]:
    """Non-square buckets whose long side was capped at `max_bucket_reso` (they hold less than the full area)."""
    m = settings.max_bucket_reso
    return [(w, h) for w, h in settings.resolutions if w != h and max(w, h) == m]


def is_degenerate(settings: BucketSettings) -> bool:
    """True when every non-square bucket hits `max_bucket_reso` (e.g. 1024² with max 1024): buckets lose area."""
    if settings.no_upscale:
        return False
    non_square = [r for r in settings.resolutions if r[0] != r[1]]
    return bool(non_square) and len(capped_buckets(settings)) == len(non_square)


def adjust_min_max_to_steps(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Round min down and max up to multiples of `steps`, as kohya's training does before bucketing."""
    if min_reso % steps:
        min_reso -= min_reso % steps
    if max_reso % steps:
        max_reso += steps - max_reso % steps
    return min_reso, max_reso


def bucket_for_displayed(bucket: Size, stored: Size, displayed: Size) -> Size:
    """The bucket turned to the displayed image when it was computed from the stored pixel grid of a rotated photo.

    kohya's tools never apply EXIF orientation, so metadata they wrote (no `image_size`, `train_resolution` from the
    stored size) gives a photo that EXIF turns by 90° the bucket of its unturned pixels: a 400x200 grid shown as
    200x400 keeps a 704x320 bucket, and covering that with the upright image keeps 23 % of it. When the stored and
    displayed sizes differ and the bucket's aspect is closer to the stored one, the bucket is transposed: kohya's
    bucket list holds every bucket both ways round, and the transposed bucket crops the upright picture as kohya's
    bucket crops the stored one. Anything else comes back unchanged.
    """
    if stored == displayed or stored != (displayed[1], displayed[0]):
        return bucket

    def aspect_error(size: Size) -> float:
        return abs(math.log((bucket[0] / bucket[1]) / (size[0] / size[1])))

    if aspect_error(stored) < aspect_error(displayed):
        return (bucket[1], bucket[0])
    return bucket
