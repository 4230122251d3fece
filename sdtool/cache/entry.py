"""The native latent cache entry (`--format sdtool`): its file name, its record, reading, writing and checking.

One safetensors file per image in a cache folder, by default `<META stem>.latents/` beside the metadata file. The
file is named `<stem>-<h>.safetensors`, `<h>` being the first 16 hex digits of sha256 of the image's resolved
absolute path (the stem is only there for people). Tensors, all float32 and unscaled (before the VAE's
`scaling_factor`), shaped (4, h/8, w/8) for a bucket w×h:
- `mean`, `std`: the VAE posterior of the §F pixels;
- `flipped_mean`, `flipped_std`: the same for the crop mirrored left-right (only with `--flip-aug`).

The safetensors metadata holds `{"sdtool_latents": "1", "record": <JSON>}`; the record says what the entry was
made from: `image` (path), `source` (`size`, `mtime_ns`, `sha256` of the file), `original_size`, `bucket`,
`resized`, `crop_ltrb`, `interpolation`, `vae` (fingerprint, see `fingerprint.vae_fingerprint`), `vae_source`,
`dtype` and `flip`. `record_problem` says why a record does not fit what is asked for (stale or missing).

A damaged entry is stale, never "ok" and never a crash: `read_native_entry` checks the file against its own header
(a truncated file, tensors whose byte size does not match their shape) and the record against its schema
(`check_record`); `tensor_problem` checks the tensors an entry must hold for its bucket, and `data_problem` that
their values are finite. `cache --status`, `cache` (which re-encodes what is stale) and training all use these,
so they agree on every entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from sdtool.cache.fingerprint import read_safetensors_header, source_change
from sdtool.cache.placement import Placement, latent_shape
from sdtool.errors import SdtoolError

if TYPE_CHECKING:
    import torch


CacheFormat = Literal["sdtool", "kohya"]


LoadFormat = Literal["auto", "sdtool", "kohya"]


Status = Literal["ok", "missing", "stale"]


NATIVE_SUFFIX = ".safetensors"


RECORD_VERSION = "1"


_CACHE_HINT = "run 'sdtool cache META --model MODEL' to (re)encode it"


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


Pair = Annotated[list[StrictInt], Field(min_length=2, max_length=2)]


class _SourceShape(BaseModel):
    """`record["source"]`: the image file's fingerprint (fingerprint.source_fingerprint)."""

    model_config = ConfigDict(strict=True, extra="allow")
    size: int
    mtime_ns: int
    sha256: str


class _RecordShape(BaseModel):
    """The record `make_record` writes, with its types: what `check_record` holds a stored record to."""

    model_config = ConfigDict(strict=True, extra="allow")
    version: int
    image: str
    source: _SourceShape
    original_size: Pair
    bucket: Pair
    resized: Pair
    crop_ltrb: Annotated[list[StrictInt], Field(min_length=4, max_length=4)]
    interpolation: str
    vae: str
    vae_source: str
    dtype: str
    flip: bool


class LatentCacheError(SdtoolError):
    """A cached latent that cannot be used; `path` is the image, `reason` says why."""

    def __init__(self, image_path: str | Path, reason: str, hint: str | None = None):
        self.path = Path(image_path)
        self.reason = reason
        super().__init__(f"{image_path}: {reason}", hint or _CACHE_HINT)


class MissingLatentsError(LatentCacheError):
    """No cache entry for an image (or one without the flipped latents that flip-aug needs)."""


class StaleLatentsError(LatentCacheError):
    """A cache entry made from another image, bucket, crop or VAE than the one asked for."""


def make_record(
    image_path: str | Path,
    placement: Placement,
    source: Mapping[str, Any],
    *,
    interpolation: str,
    vae: str,
    vae_source: str,
    dtype: str,
    flip: bool,
) -> dict[str, Any]:
    """The record stored with an entry: what it was made from."""
    return {
        "version": int(RECORD_VERSION),
        "image": str(image_path),
        "source": dict(source),
        "original_size": list(placement.original_size),
        "bucket": list(placement.bucket),
        "resized": list(placement.resized),
        "crop_ltrb": list(placement.crop_ltrb),
        "interpolation": interpolation,
        "vae": vae,
        "vae_source": vae_source,
        "dtype": dtype,
        "flip": bool(flip),
    }


def size_text(value: Any) -> str:
    return "x".join(str(int(v)) for v in value)


def record_problem(
    record: Mapping[str, Any],
    image_path: str | Path,
    *,
    bucket: tuple[int, int],
    placement: Placement | None = None,
    vae: str | None = None,
    flip_aug: bool = False,
    interpolation: str | None = None,
    precision: str | None = None,
    check_source: bool = True,
) -> tuple[Status, str] | None:
    """Why an entry with this record cannot be used for these expectations: ("stale"|"missing", reason), or None."""
    recorded_name = Path(str(record.get("image", ""))).name
    if recorded_name != Path(image_path).name:
        # kohya names drop the extension, so a.png and a.jpg of one size share a file: it must be the right one.
        return "stale", f"made from another image ({recorded_name or 'unknown'})"
    if list(record.get("bucket", [])) != list(bucket):
        return "stale", f"bucket changed (cached for {size_text(record.get('bucket', []))}, now {size_text(bucket)})"
    if placement is not None:
        if list(record.get("original_size", [])) != list(placement.original_size):
            return "stale", (
                f"image size changed (cached {size_text(record.get('original_size', []))}, "
                f"now {size_text(placement.original_size)})"
            )
        if list(record.get("resized", [])) != list(placement.resized) or list(record.get("crop_ltrb", [])) != list(
            placement.crop_ltrb
        ):
            return "stale", (
                f"resize/crop changed (cached resized {size_text(record.get('resized', []))}, "
                f"now {size_text(placement.resized)})"
            )
    if check_source:
        change = source_change(record.get("source", {}), image_path)
        if change:
            return "stale", change
    if vae is not None and record.get("vae") != vae:
        return "stale", f"VAE changed (cached with {record.get('vae_source') or record.get('vae')})"
    if interpolation is not None and record.get("interpolation") != interpolation:
        return "stale", f"resize interpolation changed (cached {record.get('interpolation')}, now {interpolation})"
    if precision is not None and record.get("dtype") != precision:
        return "stale", f"precision changed (cached {record.get('dtype')}, now {precision})"
    if flip_aug and not record.get("flip"):
        return "missing", "no flipped latents (cached without --flip-aug)"
    return None


def native_entry_path(image_path: str | Path, cache_dir: str | Path) -> Path:
    """The native cache file of an image: `<cache_dir>/<stem>-<sha256(resolved path)[:16]>.safetensors`.

    The folder is resolved, the file name is not: a symlink to an image is an image of its own in the metadata
    (its own name, bucket and caption), so it gets its own entry instead of fighting over its target's.
    """
    path = Path(image_path).absolute()
    resolved = path.parent.resolve() / path.name
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.stem)[:60].lstrip(".") or "image"
    return Path(cache_dir) / f"{stem}-{digest}{NATIVE_SUFFIX}"


def default_cache_dir(metadata_path: str | Path) -> Path:
    """Where native entries for a metadata file live by default: `<META stem>.latents/` beside it."""
    path = Path(metadata_path).absolute()
    return path.parent / f"{path.stem}.latents"


def check_record(record: Any, where: str | Path) -> dict[str, Any]:
    """The record if it has the shape `make_record` writes (types included); LatentCacheError naming the first
    field that does not, so a hand-edited or damaged record reads as stale instead of crashing a command."""
    from pydantic import ValidationError

    try:
        _RecordShape.model_validate(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = ".".join(str(p) for p in first["loc"]) or "record"
        raise LatentCacheError(where, f"malformed cache record ({field_name}: {first['msg']})") from None
    return dict(record)


def read_native_entry(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor header, record) of a native entry, reading only its header; LatentCacheError when the file is not a
    whole sdtool entry (truncated, tensors inconsistent with their shapes, malformed record)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, base = read_safetensors_header(f)
            size = os.fstat(f.fileno()).st_size
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or meta.get("sdtool_latents") != RECORD_VERSION:
            raise ValueError("not an sdtool latent entry")
        record = json.loads(meta["record"])
        if not isinstance(record, dict):
            raise ValueError("record is not an object")
        end = base
        for name, info in header.items():
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(int(n) for n in shape)
            if stop - begin != count * _DTYPE_BYTES.get(dtype, 0):
                raise ValueError(f"tensor {name} holds {stop - begin} bytes for a {dtype} tensor of shape {shape}")
            end = max(end, base + stop)
        if size < end:
            raise ValueError(f"truncated: {size:,} of {end:,} bytes")
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise LatentCacheError(path, f"unreadable cache entry ({exc})") from None
    return header, check_record(record, path)


def read_native_record(path: str | Path) -> dict[str, Any]:
    """The record of a native entry, reading only the safetensors header (see `read_native_entry`)."""
    return read_native_entry(path)[1]


def tensor_problem(header: Mapping[str, Any], bucket: tuple[int, int], flip_aug: bool) -> tuple[Status, str] | None:
    """Whether a native entry holds the float32 tensors its bucket needs (`mean`, `std`, and the flipped pair for
    flip-aug), by their header entries."""
    expected = list(latent_shape(bucket))
    names = ["mean", "std"] + (["flipped_mean", "flipped_std"] if flip_aug else [])
    for name in names:
        info = header.get(name)
        if info is None:
            if name.startswith("flipped"):
                return "missing", "no flipped latents (cached without --flip-aug)"
            return "stale", f"damaged cache entry: no '{name}' tensor"
        if info.get("dtype") != "F32":
            return "stale", f"damaged cache entry: '{name}' is {info.get('dtype')}, not float32"
        if list(info.get("shape", [])) != expected:
            return "stale", (
                f"latent shape {tuple(info.get('shape', []))} of '{name}' does not match the bucket "
                f"{bucket[0]}x{bucket[1]}"
            )
    return None


def data_problem(path: str | Path) -> str | None:
    """Why a native entry's values cannot be used (NaN or inf, unreadable data), or None. Reads the tensors."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        return f"unreadable cache entry ({exc})"
    bad = [name for name, array in tensors.items() if not bool(np.isfinite(array).all())]
    return f"damaged cache entry: non-finite values (NaN/inf) in {', '.join(sorted(bad))}" if bad else None


def write_native_entry(path: str | Path, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> Path:
    """Write a native entry atomically (float32 contiguous tensors, record in the safetensors metadata)."""
    from safetensors.torch import save

    from sdtool.fsutil import atomic_write_bytes

    data = save(
        {name: t.detach().to("cpu").float().contiguous() for name, t in tensors.items()},
        metadata={"sdtool_latents": RECORD_VERSION, "record": json.dumps(dict(record), ensure_ascii=False)},
    )
    return atomic_write_bytes(path, data)


@dataclass
class CachedLatents:
    """Latents of one image as training uses them: float32 (4, h/8, w/8) CPU tensors, unscaled.

    Native entries have `std` (draw a fresh sample per step); kohya npz files hold one sample, so `std` is None
    and `sample` returns it. `flipped_*` are None without flip-aug. `source` is the cache file, `record` what it
    was made from (empty for foreign kohya files).
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
        """mean + std·ε with ε ~ N(0, 1) from `generator` (or a copy of the stored sample when there is no std)."""
        import torch

        if flip:
            if self.flipped_mean is None:
                raise MissingLatentsError(self.source or "latents", "no flipped latents (cached without --flip-aug)")
            mean, std = self.flipped_mean, self.flipped_std
        else:
            mean, std = self.mean, self.std
        if std is None:
            return mean.clone()
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + std * eps


def check_shape(array: Any, bucket: tuple[int, int], image_path: Path, what: str) -> None:
    expected = latent_shape(bucket)
    if tuple(array.shape) != expected:
        got = tuple(array.shape)
        raise StaleLatentsError(
            image_path,
            f"{what} holds latents of shape {got} (a {got[-1] * 8}x{got[-2] * 8} bucket) but the bucket is "
            f"{bucket[0]}x{bucket[1]}"
            if len(got) == 3
            else f"{what} holds latents of shape {got}, expected {expected}",
        )


def load_native(
    path: Path,
    image_path: Path,
    bucket: tuple[int, int],
    placement: Placement | None,
    expected_vae: str | None,
    allow_stale: bool,
    flip_aug: bool,
) -> CachedLatents:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        header, record = read_native_entry(path)
    except LatentCacheError as exc:
        raise StaleLatentsError(image_path, exc.reason) from None
    problem = record_problem(
        record, image_path, bucket=bucket, placement=placement, vae=expected_vae, flip_aug=flip_aug
    )
    if problem is not None and (problem[0] == "missing" or not allow_stale):
        kind, reason = problem
        raise (MissingLatentsError if kind == "missing" else StaleLatentsError)(image_path, reason)
    problem = tensor_problem(header, bucket, flip_aug)
    if problem is not None:
        kind, reason = problem
        raise (MissingLatentsError if kind == "missing" else StaleLatentsError)(image_path, reason)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise StaleLatentsError(image_path, f"unreadable cache entry {path} ({exc})") from None
    import torch

    bad = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise StaleLatentsError(image_path, f"damaged cache entry: non-finite values (NaN/inf) in {', '.join(bad)}")
    return CachedLatents(
        mean=tensors["mean"],
        std=tensors["std"],
        flipped_mean=tensors.get("flipped_mean"),
        flipped_std=tensors.get("flipped_std"),
        source=path,
        record=record,
    )
