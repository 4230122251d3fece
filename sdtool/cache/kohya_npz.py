"""kohya's latent cache files (`--format kohya`): names, writing, reading and checking.

`<image without ext>_<W:04d>x<H:04d><suffix>` beside the image, W×H being the image's displayed size, with
`latents` (one posterior sample, float32, (4, h/8, w/8), unscaled), `original_size` [W, H] and `crop_ltrb`, plus
`latents_flipped` with flip-aug; sdtool adds `sdtool_record` (the native entry's JSON record as a 0-d string
array), which kohya ignores. kohya's own `_sd.npz` / `_sdxl.npz` and legacy `<stem>.npz` files are read too.

The suffix decides which kohya script finds a file (`KOHYA_READERS`): kohya's caching strategy
(library/strategy_sd.py `SdSdxlLatentsCachingStrategy`, sd-scripts 48d368fa) names files `_sd.npz` when a script
constructs it with `sd=True` and `_sdxl.npz` otherwise, and the current `fine_tune.py` and `train_db.py` pass False
even for SD1/2 models. A legacy `<stem>.npz` beside the image wins over both in every kohya script.

The fields mean what kohya writes (library/train_util.py `trim_and_resize_if_required`), which is not what the
native format's record says: `crop_ltrb` is `BucketManager.get_crop_ltrb(bucket, original_size)`, the box the
image would fill if fitted *inside* the bucket (Stability's SDXL preprocessing; float64), not the centre crop of the
cover-resized image that sdtool trains on (the record's `crop_ltrb`, ints in resized pixels); `original_size` is
the displayed (EXIF-rotated) size, the size the latents were made from (kohya writes the stored pixel grid, which
differs for a rotated photo because kohya never applies EXIF orientation).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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


KohyaSuffix = Literal["_sd.npz", "_sdxl.npz"]


KOHYA_SUFFIXES: tuple[KohyaSuffix, ...] = ("_sd.npz", "_sdxl.npz")


# Which kohya sd-scripts (48d368fa) read which name, for SD1/2 models: the `sd` argument of each script's
# SdSdxlLatentsCachingStrategy (fine_tune.py L61-64, train_db.py L67-69, train_network.py L198-201, …).
KOHYA_READERS: dict[KohyaSuffix, tuple[str, ...]] = {
    "_sd.npz": ("train_network.py", "train_textual_inversion.py", "train_control_net.py", "tools/cache_latents.py"),
    "_sdxl.npz": ("fine_tune.py", "train_db.py", "sdxl_train.py", "sdxl_train_network.py", "the other sdxl_* scripts"),
}


def kohya_crop_ltrb(bucket: tuple[int, int], original_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya's `BucketManager.get_crop_ltrb(bucket_reso, image_size)` (library/train_util.py L348-366), verbatim.

    The box (left, top, right, bottom) the image covers when fitted inside the bucket, in bucket pixels, as kohya
    stores it in its npz files (floats: one side is always a true division).
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original_size[0] / original_size[1]
    if bucket_ar > image_ar:
        resized_width: float = bucket[1] * image_ar
        resized_height: float = bucket[1]
    else:
        resized_width = bucket[0]
        resized_height = bucket[0] / image_ar
    crop_left = (bucket[0] - resized_width) // 2
    crop_top = (bucket[1] - resized_height) // 2
    return (float(crop_left), float(crop_top), float(crop_left + resized_width), float(crop_top + resized_height))


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
    crop_ltrb: tuple[float, float, float, float],
    latents_flipped: np.ndarray | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a kohya-format npz atomically (uncompressed, as kohya's `np.savez`)."""
    import numpy as np

    from sdtool.fsutil import atomic_write_bytes

    arrays: dict[str, Any] = {
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "original_size": np.asarray(original_size, dtype=np.int64),
        "crop_ltrb": np.asarray(crop_ltrb, dtype=np.float64),  # kohya's np.array(get_crop_ltrb(...)) is float64
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
