"""The pixel pipeline of CONTRACT §F, shared by `sdtool cache` and training's uncached path.

load (§C) → resize to the bucket's `resized` size (PIL LANCZOS by default) → centre crop to the bucket →
values in [−1, 1] (`x / 127.5 − 1`), RGB, CHW.

Resampling filters: PIL's for lanczos, bicubic, bilinear, box and nearest; OpenCV's `INTER_AREA` for "area", the
filter kohya's sd-scripts shrink with; "kohya" is kohya's own rule (library/utils.py `resize_image`): `INTER_AREA`
when the image shrinks on both sides, PIL LANCZOS otherwise. OpenCV is used rather than a re-implementation
because only OpenCV's own code gives OpenCV's pixels bit for bit (its fixed-point fast path for integer factors and
its float accumulation order are implementation details), and kohya's latents come from those pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtool.bucket.algorithm import crop_ltrb
from sdtool.errors import ImageError, MissingDependencyError
from sdtool.images import open_image

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    # kohya's aliases (its --resize_interpolation accepts both spellings)
    "linear": Image.Resampling.BILINEAR,
    "cubic": Image.Resampling.BICUBIC,
}

KOHYA_RULE = "kohya"

INTERPOLATIONS = (*_PIL_FILTERS, "area", KOHYA_RULE)
"""Every resampling choice: PIL filters, OpenCV's area filter, and kohya's rule (area down, Lanczos up)."""

__all__ = ["INTERPOLATIONS", "KOHYA_RULE", "crop_ltrb", "load_bucketed_pixels", "resize_and_crop", "to_tensor"]


def check_interpolation(interpolation: str) -> None:
    """Raise before any work when `interpolation` needs a package that is missing (OpenCV for area / kohya).

    OpenCV is imported here, on the calling thread, so the decoding threads find it loaded: two threads importing
    it at once see a half-made module (`cv2.__spec__ is None`).
    """
    if interpolation in ("area", KOHYA_RULE):
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "opencv-python-headless", f"resize interpolation {interpolation!r} (OpenCV's area filter, as kohya's)"
            ) from None


def _area_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenCV's INTER_AREA on the RGB pixels, as kohya's `resize_image` calls it (`cv2.resize(image, size, …)`)."""
    check_interpolation("area")
    import cv2

    return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_AREA))


def resize_and_crop(
    img: Image.Image, resized: tuple[int, int], bucket: tuple[int, int], interpolation: str = "lanczos"
) -> np.ndarray:
    """Resize to `resized`, centre-crop to `bucket`; uint8 HWC RGB."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    size = (int(resized[0]), int(resized[1]))
    if img.size != size:
        if interpolation == KOHYA_RULE:
            shrinks = img.size[0] >= size[0] and img.size[1] >= size[1]
            interpolation = "area" if shrinks else "lanczos"
        if interpolation == "area":
            img = _area_resize(img, size)
        else:
            img = img.resize(size, resample=_PIL_FILTERS[interpolation])
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
