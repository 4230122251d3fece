"""The pixel pipeline of CONTRACT §F, shared by `sdtool cache` and training's uncached path.

load (§C) → resize to the bucket's `resized` size (PIL LANCZOS by default) → centre crop to the bucket →
values in [−1, 1] (`x / 127.5 − 1`), RGB, CHW.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtool.bucket.algorithm import crop_ltrb
from sdtool.errors import ImageError
from sdtool.images import open_image

# "area" has no exact PIL twin; BOX averages every source pixel that falls in the target pixel, which is what
# area interpolation does when downscaling.
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

__all__ = ["INTERPOLATIONS", "crop_ltrb", "load_bucketed_pixels", "resize_and_crop", "to_tensor"]


def resize_and_crop(
    img: Image.Image, resized: tuple[int, int], bucket: tuple[int, int], interpolation: str = "lanczos"
) -> np.ndarray:
    """Resize to `resized`, centre-crop to `bucket`; uint8 HWC RGB."""
    try:
        resample = INTERPOLATIONS[interpolation]
    except KeyError as exc:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}") from exc
    if img.size != tuple(resized):
        img = img.resize((resized[0], resized[1]), resample=resample)
    box = crop_ltrb(resized, bucket)
    return np.asarray(img.crop(box), dtype=np.uint8)


def load_bucketed_pixels(
    path: str | Path,
    resized: tuple[int, int],
    bucket: tuple[int, int],
    interpolation: str = "lanczos",
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Open an image and give its bucket crop as uint8 HWC RGB; raises ImageError for unusable files.

    `expected_size` is the displayed size the bucket was computed from: an image that changed size since then
    would be cropped wrongly, so it is refused with a reason.
    """
    img = open_image(path)
    if expected_size is not None and tuple(img.size) != tuple(expected_size):
        raise ImageError(
            path,
            f"image is {img.size[0]}x{img.size[1]} but the metadata says {expected_size[0]}x{expected_size[1]}",
            hint="run sdtool bucket again",
        )
    try:
        return resize_and_crop(img, resized, bucket, interpolation)
    except ValueError as exc:
        raise ImageError(path, str(exc)) from exc


def to_tensor(pixels: np.ndarray, flip: bool = False) -> Any:
    """uint8 HWC → float32 CHW in [−1, 1]; `flip` mirrors left-right."""
    import torch

    arr = pixels[:, ::-1] if flip else pixels
    # PIL-backed arrays are read-only; torch wants a writable buffer (one bucket-sized uint8 copy at most).
    t = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).float()
    return t / 127.5 - 1.0
