"""kohya's latent cache files (`--format kohya`): names, writing, reading and checking.

`<image without ext>_<W:04d>x<H:04d>_sd.npz` beside the image with `latents` (one posterior sample, float32,
(4, h/8, w/8), unscaled), `original_size` [W, H], `crop_ltrb` and `latents_flipped` with flip-aug; sdtool adds
`sdtool_record` (the native entry's JSON record as a 0-d string array), which kohya ignores. kohya's own
`_sdxl.npz` and legacy `<stem>.npz` files are read too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtool.cache.entry import (
    CachedLatents,
    LatentCacheError,
    MissingLatentsError,
    StaleLatentsError,
    Status,
    check_record,
    check_shape,
    record_problem,
    size_text,
)
from sdtool.cache.placement import Placement, latent_shape

if TYPE_CHECKING:
    import numpy as np


KOHYA_SUFFIXES = ("_sd.npz", "_sdxl.npz")


def kohya_npz_path(image_path: str | Path, original_size: tuple[int, int], suffix: str = "_sd.npz") -> Path:
    """kohya's cache name: `<image without ext>_<W:04d>x<H:04d><suffix>` beside the image."""
    image_path = Path(image_path)
    w, h = original_size
    return image_path.with_name(f"{image_path.stem}_{int(w):04d}x{int(h):04d}{suffix}")


def kohya_legacy_npz_path(image_path: str | Path) -> Path:
    """kohya's old name `<image without ext>.npz` (pre-2024 trainers)."""
    return Path(image_path).with_suffix(".npz")


def write_kohya_npz(
    path: str | Path,
    latents: np.ndarray,
    *,
    original_size: tuple[int, int],
    crop_ltrb: tuple[int, int, int, int],
    latents_flipped: np.ndarray | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a kohya-format npz atomically (uncompressed, as kohya's `np.savez`)."""
    import numpy as np

    from sdtool.fsutil import atomic_write_bytes

    arrays: dict[str, Any] = {
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "original_size": np.asarray(original_size, dtype=np.int64),
        "crop_ltrb": np.asarray(crop_ltrb, dtype=np.int64),
    }
    if latents_flipped is not None:
        arrays["latents_flipped"] = np.ascontiguousarray(latents_flipped, dtype=np.float32)
    if record is not None:
        arrays["sdtool_record"] = np.asarray(json.dumps(dict(record), ensure_ascii=False))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class NpzLatents:
    path: Path
    latents: Any
    latents_flipped: Any
    original_size: tuple[int, int] | None
    record: dict[str, Any] | None


def read_npz(path: Path, image_path: Path) -> NpzLatents:
    """Read a kohya npz; LatentCacheError (stale) for anything that is not a whole, finite, float latent file."""
    import zipfile
    import zlib

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if "latents" not in z.files:
                raise LatentCacheError(image_path, f"{path} has no 'latents' array (old or foreign format)")
            latents = z["latents"]
            flipped = z["latents_flipped"] if "latents_flipped" in z.files else None
            original = tuple(int(v) for v in z["original_size"]) if "original_size" in z.files else None
            record = json.loads(str(z["sdtool_record"])) if "sdtool_record" in z.files else None
    except LatentCacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # json.JSONDecodeError and NumPy's refusal of pickled (object) arrays are ValueErrors too.
        raise LatentCacheError(image_path, f"unreadable cache file {path} ({exc})") from None
    if latents.ndim == 4 and latents.shape[0] == 1:  # some writers keep the batch axis
        latents = latents[0]
        if flipped is not None and flipped.ndim == 4:
            flipped = flipped[0]
    for name, array in (("latents", latents), ("latents_flipped", flipped)):
        if array is None:
            continue
        if array.dtype.kind != "f":
            raise LatentCacheError(image_path, f"{path}: '{name}' holds {array.dtype}, not floating-point latents")
        if not bool(np.isfinite(array).all()):
            raise LatentCacheError(image_path, f"{path}: non-finite values (NaN/inf) in '{name}'")
    if record is not None:
        record = check_record(record, path)
    return NpzLatents(path, latents, flipped, original, record)  # type: ignore[arg-type]


def kohya_candidates(image_path: Path, original_size: tuple[int, int]) -> list[Path]:
    return [kohya_npz_path(image_path, original_size, s) for s in KOHYA_SUFFIXES] + [kohya_legacy_npz_path(image_path)]


def kohya_problem(
    npz: NpzLatents,
    image_path: Path,
    bucket: tuple[int, int],
    original_size: tuple[int, int],
    placement: Placement | None,
    expected_vae: str | None,
    flip_aug: bool,
    interpolation: str | None = None,
    precision: str | None = None,
) -> tuple[Status, str] | None:
    """Staleness of a kohya file: full record checks when sdtool wrote it, else shape/size/mtime."""
    expected = latent_shape(bucket)
    if tuple(npz.latents.shape) != expected:
        got = tuple(npz.latents.shape)
        return "stale", f"latent shape {got} does not match the bucket {bucket[0]}x{bucket[1]}"
    if npz.original_size is not None and tuple(npz.original_size) != tuple(original_size):
        return "stale", f"made from a {size_text(npz.original_size)} image, the image is now {size_text(original_size)}"
    if npz.record is not None:
        problem = record_problem(
            npz.record,
            image_path,
            bucket=bucket,
            placement=placement,
            vae=expected_vae,
            flip_aug=False,
            interpolation=interpolation,
            precision=precision,
        )
        if problem is not None:
            return problem
    else:
        try:
            if image_path.stat().st_mtime_ns > npz.path.stat().st_mtime_ns:
                return "stale", f"image is newer than {npz.path.name}"
        except OSError:
            return "missing", "image file not found"
    if flip_aug and npz.latents_flipped is None:
        return "missing", "no flipped latents (cached without --flip-aug)"
    return None


def load_kohya(
    image_path: Path,
    bucket: tuple[int, int],
    original_size: tuple[int, int],
    placement: Placement | None,
    expected_vae: str | None,
    allow_stale: bool,
    flip_aug: bool,
) -> CachedLatents | None:
    import torch

    for path in kohya_candidates(image_path, original_size):
        if not path.is_file():
            continue
        npz = read_npz(path, image_path)
        if npz.latents_flipped is None and path.name == kohya_legacy_npz_path(image_path).name:
            flip_file = path.with_name(path.stem + "_flip.npz")
            if flip_file.is_file():
                npz.latents_flipped = read_npz(flip_file, image_path).latents
        problem = kohya_problem(npz, image_path, bucket, original_size, placement, expected_vae, flip_aug)
        if problem is not None:
            kind, reason = problem
            shape_ok = tuple(npz.latents.shape) == latent_shape(bucket)
            if kind == "missing" or not allow_stale or not shape_ok:
                raise (MissingLatentsError if kind == "missing" else StaleLatentsError)(
                    image_path, f"{path.name}: {reason}"
                )
        flipped = npz.latents_flipped
        if flip_aug and flipped is None:
            raise MissingLatentsError(image_path, f"{path.name}: no flipped latents (cached without --flip-aug)")
        if flipped is not None:
            check_shape(flipped, bucket, image_path, str(path))
        return CachedLatents(
            mean=torch.from_numpy(npz.latents.astype("float32")),
            std=None,
            flipped_mean=torch.from_numpy(flipped.astype("float32")) if flipped is not None else None,
            source=path,
            record=npz.record or {},
        )
    return None
