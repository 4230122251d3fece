"""Read single-file checkpoints safely: safetensors first, pickles only through `torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from sdtool.console import warn
from sdtool.errors import ModelError, UnsafeCheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def is_single_file(path: str | Path) -> bool:
    """A checkpoint file sdtool can read (by extension)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors of a single file (`state_dict` wrappers unwrapped) and its safetensors metadata ({} for pickles)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle), {}
    raise ModelError(f"{path}: unknown checkpoint extension {suffix!r}", hint="use .safetensors, .ckpt or .pt")


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if not allow_pickle:
            # weights_only refuses any global it does not know before calling it, so the payload never ran.
            raise UnsafeCheckpointError(
                f"{path}: this pickle needs more than plain tensors to load, and unpickling it could run code "
                f"hidden in the file ({reason})",
                hint="only if you trust its source, pass --allow-pickle; better, ask for a .safetensors file",
            ) from exc
        warn(f"{path}: loading with full unpickling (--allow-pickle): this runs any code in the file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelError(f"{path}: cannot read the checkpoint ({exc2})") from exc2
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the checkpoint ({exc})") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {key: value for key, value in obj.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path}: holds no tensors")
    return tensors


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that says what the file needs (e.g. `Unsupported global: …`)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if found:
        return f"it asks for {found[1]}"
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().rstrip(".")
    return next((line for line in lines if line), type(exc).__name__)


def dominant_float_dtype(state_dict: dict[str, Any]) -> Any:
    """The float dtype holding most of the elements (the checkpoint's storage precision), or None."""
    counts: dict[Any, int] = {}
    for value in state_dict.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=lambda dtype: counts[dtype]) if counts else None
