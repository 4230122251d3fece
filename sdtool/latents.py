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

import hashlib
import io
import json
import os
import re
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from sdtool.errors import ImageError, InputError, ModelError, SdtoolError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

CacheFormat = Literal["sdtool", "kohya"]
LoadFormat = Literal["auto", "sdtool", "kohya"]
Status = Literal["ok", "missing", "stale"]

NATIVE_SUFFIX = ".safetensors"
RECORD_VERSION = "1"
KOHYA_SUFFIXES = ("_sd.npz", "_sdxl.npz")
_CACHE_HINT = "run 'sdtool cache META --model MODEL' to (re)encode it"


# --- errors ---------------------------------------------------------------------------------------------------


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


class MissingBucketError(UsageError):
    """Metadata without `train_resolution`: the images were not bucketed yet (exit 2)."""


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


def placement_from_entry(fields: Mapping[str, Any], image_path: str | Path | None = None) -> Placement:
    """The Placement a metadata entry describes; `image_size` missing → read from the image header.

    Raises MissingBucketError without `train_resolution`, InputError for malformed fields, ImageError when the
    header has to be read and cannot be.
    """
    from sdtool.buckets import cover_resize
    from sdtool.images import read_size
    from sdtool.pixels import crop_ltrb

    where = image_path if image_path is not None else "metadata entry"
    if fields.get("train_resolution") is None:
        raise MissingBucketError(f"{where}: no train_resolution in the metadata", hint="run sdtool bucket first")
    bw, bh = _int_tuple(fields["train_resolution"], 2, "train_resolution", where)
    if bw <= 0 or bh <= 0 or bw % 8 or bh % 8:
        raise InputError(where, f"bucket {bw}x{bh} is not a positive multiple of 8")
    if fields.get("image_size") is not None:
        w, h = _int_tuple(fields["image_size"], 2, "image_size", where)
    elif image_path is not None:
        w, h = read_size(image_path)
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


# --- source and VAE fingerprints ------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_fingerprint(path: str | Path) -> dict[str, Any]:
    """What a cache entry records about its image file: size, mtime (ns) and sha256 of the bytes."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def source_change(recorded: Mapping[str, Any], path: str | Path) -> str | None:
    """Why the image at `path` differs from the recorded fingerprint, or None when it is the same file.

    Same size and mtime count as unchanged without reading the file (so checking a large dataset stays cheap);
    a changed mtime with the same size is settled by the content hash, so a copied or touched file stays valid.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "image file not found"
    if st.st_size != recorded.get("size"):
        return f"image changed since it was cached ({recorded.get('size')} → {st.st_size} bytes)"
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    if file_sha256(path) != recorded.get("sha256"):
        return "image changed since it was cached (content differs)"
    return None


_ENCODER_PREFIXES = ("first_stage_model.", "vae.")
_fingerprint_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def _is_encoder_key(name: str) -> bool:
    for prefix in _ENCODER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.startswith(("encoder.", "quant_conv."))


def _read_safetensors_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header of an open safetensors file and the offset where its tensor data starts.

    Raises ValueError (JSON and UTF-8 errors are ValueErrors) or struct.error for a file that is not one.
    """
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > 100_000_000:  # safetensors' own limit: refuse before reading a bogus length
        raise ValueError("header too large")
    header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + header_len


def _safetensors_encoder_digest(path: Path) -> str:
    """sha256 over the sorted per-tensor digests (dtype + raw bytes) of the encoder and quant_conv tensors.

    Sorting the digests and leaving names and shapes out makes the fingerprint the same for the same weights in
    the diffusers and the original LDM layout (whose attention weights are 1×1 convs with identical bytes);
    the decoder is left out because latents do not depend on it (a decoder-only fine-tune keeps the cache valid).
    """
    with open(path, "rb") as f:
        try:
            header, base = _read_safetensors_header(f)
        except (ValueError, struct.error) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
        tensors = sorted(
            ((name, info) for name, info in header.items() if name != "__metadata__" and _is_encoder_key(name)),
            key=lambda item: item[1]["data_offsets"][0],
        )
        if not tensors:
            raise ModelError(f"{path}: no VAE encoder weights (encoder.*, quant_conv.*) in this file")
        digests = []
        for _name, info in tensors:
            begin, end = info["data_offsets"]
            h = hashlib.sha256(str(info["dtype"]).encode())
            f.seek(base + begin)
            remaining = end - begin
            while remaining:
                chunk = f.read(min(remaining, 1 << 22))
                if not chunk:
                    raise ModelError(f"{path}: truncated safetensors file")
                h.update(chunk)
                remaining -= len(chunk)
            digests.append(h.hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def _weights_fingerprint(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if memo_key in _fingerprint_memo:
            return _fingerprint_memo[memo_key]
    if path.suffix == ".safetensors":
        fp = "enc-sha256:" + _safetensors_encoder_digest(path)[:32]
    else:
        # Pickled weights cannot be read without unpickling; the whole file's bytes stand in for the encoder.
        fp = "file-sha256:" + file_sha256(path)[:32]
    with _memo_lock:
        _fingerprint_memo[memo_key] = fp
    return fp


_VAE_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


def vae_weight_file(source: str | Path) -> Path:
    """The file holding the VAE weights that `load_vae`/`load_model` would read for `source` (no model load)."""
    src = str(source)
    path = Path(src)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                for name in _VAE_WEIGHT_NAMES:
                    if (folder / name).is_file():
                        return folder / name
        raise ModelError(f"{src}: no VAE weights found (looked for vae/diffusion_pytorch_model.* and ./)")
    if src.count("/") == 1 and not src.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        for subfolder in ("vae/", ""):
            if not isinstance(try_to_load_from_cache(src, subfolder + "config.json"), str):
                continue
            for name in _VAE_WEIGHT_NAMES:
                found = try_to_load_from_cache(src, subfolder + name)
                if isinstance(found, str):
                    return Path(found)
        raise ModelError(
            f"{src}: the VAE is not in the local Hugging Face cache, so it cannot be fingerprinted",
            hint="run sdtool cache once with this model (it downloads it)",
        )
    raise ModelError(f"{src}: no such file or folder, and not a hub id (owner/name)")


def vae_fingerprint(source: str | Path) -> str:
    """A fingerprint of the VAE encoder weights in `source`, computed from the files without loading a model.

    `source` is a diffusers model folder (its `vae/`), a VAE folder, a single .safetensors checkpoint (full or
    VAE-only), a .ckpt/.pt/.bin file, or a hub id already in the local Hugging Face cache. Safetensors give
    `enc-sha256:…`, a digest of the encoder + quant_conv tensors only (layout-independent, decoder ignored);
    pickled files give `file-sha256:…` of the whole file. Results are memoised per (file, size, mtime).
    """
    return _weights_fingerprint(vae_weight_file(source))


# --- entries: records, reading and writing ---------------------------------------------------------------------


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


def _size(value: Any) -> str:
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
        return "stale", f"bucket changed (cached for {_size(record.get('bucket', []))}, now {_size(bucket)})"
    if placement is not None:
        if list(record.get("original_size", [])) != list(placement.original_size):
            return "stale", (
                f"image size changed (cached {_size(record.get('original_size', []))}, "
                f"now {_size(placement.original_size)})"
            )
        if list(record.get("resized", [])) != list(placement.resized) or list(record.get("crop_ltrb", [])) != list(
            placement.crop_ltrb
        ):
            return "stale", (
                f"resize/crop changed (cached resized {_size(record.get('resized', []))}, "
                f"now {_size(placement.resized)})"
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


def kohya_npz_path(image_path: str | Path, original_size: tuple[int, int], suffix: str = "_sd.npz") -> Path:
    """kohya's cache name: `<image without ext>_<W:04d>x<H:04d><suffix>` beside the image."""
    image_path = Path(image_path)
    w, h = original_size
    return image_path.with_name(f"{image_path.stem}_{int(w):04d}x{int(h):04d}{suffix}")


def kohya_legacy_npz_path(image_path: str | Path) -> Path:
    """kohya's old name `<image without ext>.npz` (pre-2024 trainers)."""
    return Path(image_path).with_suffix(".npz")


def read_native_record(path: str | Path) -> dict[str, Any]:
    """The record of a native entry, reading only the safetensors header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, _ = _read_safetensors_header(f)
        meta = header.get("__metadata__") or {}
        if meta.get("sdtool_latents") != RECORD_VERSION:
            raise ValueError("not an sdtool latent entry")
        record = json.loads(meta["record"])
        if not isinstance(record, dict):
            raise ValueError("record is not an object")
        return record
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise LatentCacheError(path, f"unreadable cache entry ({exc})") from None


def write_native_entry(path: str | Path, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> Path:
    """Write a native entry atomically (float32 contiguous tensors, record in the safetensors metadata)."""
    from safetensors.torch import save

    from sdtool.fsutil import atomic_write_bytes

    data = save(
        {name: t.detach().to("cpu").float().contiguous() for name, t in tensors.items()},
        metadata={"sdtool_latents": RECORD_VERSION, "record": json.dumps(dict(record), ensure_ascii=False)},
    )
    return atomic_write_bytes(path, data)


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
class _Npz:
    path: Path
    latents: Any
    latents_flipped: Any
    original_size: tuple[int, int] | None
    record: dict[str, Any] | None


def _read_npz(path: Path, image_path: Path) -> _Npz:
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
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise LatentCacheError(image_path, f"unreadable cache file {path} ({exc})") from None
    if latents.ndim == 4 and latents.shape[0] == 1:  # some writers keep the batch axis
        latents = latents[0]
        if flipped is not None and flipped.ndim == 4:
            flipped = flipped[0]
    return _Npz(path, latents, flipped, original, record)  # type: ignore[arg-type]


# --- loading for training ----------------------------------------------------------------------------------------


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


def _check_shape(array: Any, bucket: tuple[int, int], image_path: Path, what: str) -> None:
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


def _load_native(
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

    record = read_native_record(path)
    problem = record_problem(
        record, image_path, bucket=bucket, placement=placement, vae=expected_vae, flip_aug=flip_aug
    )
    if problem is not None and (problem[0] == "missing" or not allow_stale):
        kind, reason = problem
        raise (MissingLatentsError if kind == "missing" else StaleLatentsError)(image_path, reason)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise LatentCacheError(image_path, f"unreadable cache entry {path} ({exc})") from None
    _check_shape(tensors["mean"], bucket, image_path, str(path))
    if flip_aug and "flipped_mean" not in tensors:
        raise MissingLatentsError(image_path, "no flipped latents (cached without --flip-aug)")
    return CachedLatents(
        mean=tensors["mean"],
        std=tensors.get("std"),
        flipped_mean=tensors.get("flipped_mean"),
        flipped_std=tensors.get("flipped_std"),
        source=path,
        record=record,
    )


def _kohya_candidates(image_path: Path, original_size: tuple[int, int]) -> list[Path]:
    return [kohya_npz_path(image_path, original_size, s) for s in KOHYA_SUFFIXES] + [kohya_legacy_npz_path(image_path)]


def _kohya_problem(
    npz: _Npz,
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
        return "stale", f"made from a {_size(npz.original_size)} image, the image is now {_size(original_size)}"
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


def _load_kohya(
    image_path: Path,
    bucket: tuple[int, int],
    original_size: tuple[int, int],
    placement: Placement | None,
    expected_vae: str | None,
    allow_stale: bool,
    flip_aug: bool,
) -> CachedLatents | None:
    import torch

    for path in _kohya_candidates(image_path, original_size):
        if not path.is_file():
            continue
        npz = _read_npz(path, image_path)
        if npz.latents_flipped is None and path.name == kohya_legacy_npz_path(image_path).name:
            flip_file = path.with_name(path.stem + "_flip.npz")
            if flip_file.is_file():
                npz.latents_flipped = _read_npz(flip_file, image_path).latents
        problem = _kohya_problem(npz, image_path, bucket, original_size, placement, expected_vae, flip_aug)
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
            _check_shape(flipped, bucket, image_path, str(path))
        return CachedLatents(
            mean=torch.from_numpy(npz.latents.astype("float32")),
            std=None,
            flipped_mean=torch.from_numpy(flipped.astype("float32")) if flipped is not None else None,
            source=path,
            record=npz.record or {},
        )
    return None


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
            from sdtool.pixels import crop_ltrb

            resized = (int(resized[0]), int(resized[1]))
            placement = Placement(original_size, bucket, resized, crop_ltrb(resized, bucket))
    looked: list[str] = []
    if fmt in ("auto", "sdtool"):
        if cache_dir is not None:
            native = native_entry_path(image_path, cache_dir)
            if native.is_file():
                return _load_native(native, image_path, bucket, placement, expected_vae, allow_stale, flip_aug)
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
        found = _load_kohya(image_path, bucket, original_size, placement, expected_vae, allow_stale, flip_aug)
        if found is not None:
            return found
        looked += [str(p) for p in _kohya_candidates(image_path, original_size)]
    raise MissingLatentsError(image_path, "no cached latents (looked for " + ", ".join(looked) + ")")


# --- status ----------------------------------------------------------------------------------------------------


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
) -> EntryStatus:
    """The cache state of one planned image (reads headers only; hashes the image only if its mtime changed)."""
    p = item.placement
    if fmt == "sdtool":
        if cache_dir is None:
            raise UsageError("the sdtool cache format needs a cache folder")
        path = native_entry_path(item.image_path, cache_dir)
        if not path.is_file():
            return EntryStatus(item.key, item.image_path, "missing", "not cached yet", path, p)
        try:
            record = read_native_record(path)
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
        )
    else:
        path = kohya_npz_path(item.image_path, p.original_size)
        if not path.is_file():
            return EntryStatus(item.key, item.image_path, "missing", "not cached yet", path, p)
        try:
            npz = _read_npz(path, item.image_path)
        except LatentCacheError as exc:
            return EntryStatus(item.key, item.image_path, "stale", exc.reason, path, p)
        problem = _kohya_problem(
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
