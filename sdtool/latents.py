"""The latent cache (CONTRACT §F): entry layout, fingerprints, staleness, kohya npz interop.

Native layout (`--format sdtool`): one safetensors file per image in a cache folder, by default
`<META stem>.latents/` beside the metadata file. The file is named `<stem>-<h>.safetensors`, `<h>` being the first
16 hex digits of sha256 of the image's resolved absolute path (the stem is only there for people). Tensors, all
float32 and unscaled (before the VAE's `scaling_factor`), shaped (4, h/8, w/8) for a bucket w×h:

- `mean`, `std`: the VAE posterior of the §F pixels;
- `flipped_mean`, `flipped_std`: the same for the crop mirrored left-right (only with `--flip-aug`).

The safetensors metadata holds `{"sdtool_latents": "1", "record": <JSON>}`; the record says what the entry was
made from: `image` (path), `source` (`size`, `mtime_ns`, `sha256` of the file), `original_size`, `bucket`,
`resized`, `crop_ltrb`, `interpolation`, `vae` (fingerprint, see `vae_fingerprint`), `vae_source`, `dtype`
and `flip`.

kohya layout (`--format kohya`): `<image without ext>_<W:04d>x<H:04d>_sd.npz` beside the image with `latents`
(one posterior sample, float32, (4, h/8, w/8), unscaled), `original_size` [W, H], `crop_ltrb` (the real centre
crop in resized pixels) and `latents_flipped` with flip-aug; sdtool adds `sdtool_record` (the same JSON record as
a 0-d string array), which kohya ignores. kohya's own `_sdxl.npz` and legacy `<stem>.npz` files are read too.

This module imports torch lazily: `sdtool.cli` may import it without slowing `--help`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    import torch

CacheFormat = Literal["sdtool", "kohya"]
LoadFormat = Literal["auto", "sdtool", "kohya"]
Status = Literal["ok", "missing", "stale"]

NATIVE_SUFFIX = ".safetensors"
RECORD_VERSION = "1"


# --- errors ---------------------------------------------------------------------------------------------------


class LatentCacheError(SdtoolError):
    """A cached latent that cannot be used; `path` is the image, `reason` says why."""

    def __init__(self, image_path: str | Path, reason: str, hint: str | None = None):
        self.path = Path(image_path)
        self.reason = reason
        super().__init__(f"{image_path}: {reason}", hint or "run 'sdtool cache META --model MODEL' to (re)encode it")


class MissingLatentsError(LatentCacheError):
    """No cache entry for an image (or one without the flipped latents that flip-aug needs)."""


class StaleLatentsError(LatentCacheError):
    """A cache entry made from another image, bucket, crop or VAE than the one asked for."""


# --- what an entry is made from ---------------------------------------------------------------------------------


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
        return (4, self.bucket[1] // 8, self.bucket[0] // 8)


def cover_resize(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """CONTRACT §E's cover-scale rule: the resized size that covers `bucket` (used when metadata lacks it)."""
    raise NotImplementedError


def placement_from_entry(fields: Mapping[str, Any], image_path: str | Path | None = None) -> Placement:
    """The Placement a metadata entry describes; `image_size` missing → read from the image header.

    Raises `MissingBucketError` without `train_resolution`.
    """
    raise NotImplementedError


class MissingBucketError(SdtoolError):
    """Metadata without `train_resolution`: the images were not bucketed yet."""

    exit_code = 2


# --- public API for training ------------------------------------------------------------------------------------


def default_cache_dir(metadata_path: str | Path) -> Path:
    """Where native entries for a metadata file live by default: `<META stem>.latents/` beside it."""
    raise NotImplementedError


def native_entry_path(image_path: str | Path, cache_dir: str | Path) -> Path:
    """The native cache file of an image: `<cache_dir>/<stem>-<sha256(resolved path)[:16]>.safetensors`."""
    raise NotImplementedError


def kohya_npz_path(image_path: str | Path, original_size: tuple[int, int], suffix: str = "_sd.npz") -> Path:
    """kohya's cache name: `<image without ext>_<W:04d>x<H:04d><suffix>` beside the image."""
    raise NotImplementedError


@dataclass
class CachedLatents:
    """Latents of one image as training uses them: float32 (4, h/8, w/8) CPU tensors, unscaled.

    Native entries have `std` (draw a fresh sample per step); kohya npz files hold one sample, so `std` is None
    and `sample` returns it. `flipped_*` are None without flip-aug.
    """

    mean: torch.Tensor
    std: torch.Tensor | None = None
    flipped_mean: torch.Tensor | None = None
    flipped_std: torch.Tensor | None = None
    source: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def has_flipped(self) -> bool:
        return self.flipped_mean is not None

    def sample(self, flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε with ε ~ N(0, 1) from `generator` (or the stored sample when there is no std)."""
        raise NotImplementedError


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
    sdtool wrote) must also match the image file (size, mtime, else content hash), `resized` when given, and
    `expected_vae` (a `vae_fingerprint`) when given. `flip_aug=True` requires flipped latents.
    Raises MissingLatentsError / StaleLatentsError (unless `allow_stale`, which only keeps the shape check).
    """
    raise NotImplementedError


def vae_fingerprint(source: str | Path) -> str:
    """A fingerprint of the VAE encoder weights in `source`, computed from the files without loading a model.

    `source` is a diffusers model folder (its `vae/`), a VAE folder, a single .safetensors checkpoint (full or
    VAE-only), a .ckpt/.pt/.bin file, or a hub id already in the local Hugging Face cache.
    """
    raise NotImplementedError


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
        raise NotImplementedError


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
) -> list[EntryStatus]:
    """ok / missing / stale for every image of a metadata file, without encoding anything or loading a model.

    `vae` is a `vae_fingerprint` (None: the VAE is not compared); `precision` None accepts any dtype.
    Images whose key cannot be resolved or whose header cannot be read are reported stale/missing with the reason.
    """
    raise NotImplementedError
