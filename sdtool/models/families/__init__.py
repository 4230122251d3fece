"""Model families (SD1, SD2, SDXL, …): one module each behind the `ModelFamily` seam in `base`, found here by name or
recognised from weights and configs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdtool.errors import UsageError
from sdtool.models.families import sd2, sdxl
from sdtool.models.families.base import ModelFamily
from sdtool.models.families.sd1 import SD1
from sdtool.models.families.sd2 import SD2
from sdtool.models.families.sdxl import SDXL

# Every family sdtool knows, most specific first (detection tries them in this order).
FAMILIES: tuple[ModelFamily, ...] = (SDXL, SD2, SD1)
NAMES = tuple(f.name for f in FAMILIES)


def by_name(name: str) -> ModelFamily:
    """The family called `name` (as --model-type spells it)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UsageError(f"unknown model type {name!r}", hint=f"use one of {', '.join(sorted(NAMES))}")


def _pick(is_sd2: bool | None) -> ModelFamily | None:
    return None if is_sd2 is None else (SD2 if is_sd2 else SD1)


def detect_ldm(state_dict: Mapping[str, Any]) -> ModelFamily | None:
    """The family of LDM single-file weights (None: cannot tell, e.g. a U-Net of unusual width and no encoder)."""
    if sdxl.detect_ldm(state_dict):
        return SDXL
    return _pick(sd2.detect_ldm(state_dict))


def detect_configs(unet_config: Mapping[str, Any] | None, text_config: Mapping[str, Any] | None) -> ModelFamily | None:
    """The family of a diffusers model from its U-Net and text-encoder configs (None: no configs to go by)."""
    if sdxl.detect_configs(unet_config):
        return SDXL
    return _pick(sd2.detect_configs(unet_config, text_config))


def from_architecture(architecture: str) -> ModelFamily | None:
    """The family a modelspec architecture names, if any."""
    return next((f for f in FAMILIES if f.owns_architecture(architecture)), None)


def text_encoder_prefixes() -> tuple[str, ...]:
    """Every family's LDM text-encoder prefixes."""
    return tuple(p for f in FAMILIES for p in f.text_encoder_prefixes)


def detect_source(source: str | Path) -> ModelFamily | None:
    """The family of a local model from its small files only (configs, or a safetensors header), before anything
    loads; None for hub ids, pickled files and anything unreadable (they are told apart when they load)."""
    import json
    import struct

    path = Path(source)
    if path.is_dir():

        def read(rel: str) -> dict[str, Any] | None:
            try:
                data = json.loads((path / rel).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None

        unet = read("unet/config.json")
        return detect_configs(unet, read("text_encoder/config.json")) if unet is not None else None
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        if not isinstance(header, dict):
            return None

        class _Shape:  # what detection reads of a tensor: its shape
            def __init__(self, shape: list[int]):
                self.shape = tuple(shape)

        shapes = {
            k: _Shape(v.get("shape", [])) for k, v in header.items() if isinstance(v, dict) and k != "__metadata__"
        }
        return detect_ldm(shapes)
    return None
