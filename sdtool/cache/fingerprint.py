"""Fingerprints a cache entry records: the image file's (size, mtime, sha256) and the VAE encoder's weights.

The VAE fingerprint is read straight from the weight files (no model is loaded), so `cache --status` stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdtool.errors import ModelError

if TYPE_CHECKING:
    pass


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


def read_safetensors_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
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
            header, base = read_safetensors_header(f)
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
        from sdtool.models import hub

        # A model's vae/, or a VAE repo's own top level, in the local cache (never the network).
        snapshot = hub.cached_snapshot(src, {"vae": True}) or hub.cached_snapshot(src, {"": True})
        if snapshot is not None:
            return vae_weight_file(snapshot)
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
