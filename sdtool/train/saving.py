"""Writing the trained model (CONTRACT §I): the one place the training recipe hands weights to the model I/O code.

Diffusers folders are written here with `save_pretrained` and then cast to `save_precision` file by file (the live
models keep their fp32 master weights, so this also works for saves in the middle of a run). Single files
(safetensors/ckpt in the LDM layout, with modelspec metadata) are written by `sdtool.models.saving`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtool.fsutil import atomic_path

PRECISIONS = {None: "float32", "float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def save_trained_model(
    path: Path,
    fmt: str,
    *,
    unet: Any,
    text_encoder: Any,
    vae: Any,
    tokenizer: Any,
    scheduler_config: dict[str, Any],
    v2: bool,
    v_prediction: bool,
    precision: str | None,
    metadata: dict[str, str],
) -> Path:
    """Write the model as `fmt` (safetensors, ckpt, diffusers, diffusers_safetensors) at `path`, atomically."""
    import torch

    dtype = getattr(torch, PRECISIONS[precision])
    if fmt.startswith("diffusers"):
        return _save_diffusers_folder(
            path, fmt == "diffusers_safetensors", unet, text_encoder, vae, tokenizer, scheduler_config, dtype, metadata
        )
    from sdtool.models.saving import save_single_file

    return save_single_file(
        {"unet": unet, "vae": vae, "text_encoder": text_encoder},
        path,
        v2=v2,
        v_prediction=v_prediction,
        dtype=dtype,
        metadata=metadata if fmt == "safetensors" else None,
        fmt=fmt,  # type: ignore[arg-type]
    )


def _save_diffusers_folder(
    path: Path,
    safe: bool,
    unet: Any,
    text_encoder: Any,
    vae: Any,
    tokenizer: Any,
    scheduler_config: dict[str, Any],
    dtype: Any,
    metadata: dict[str, str],
) -> Path:
    import diffusers
    from diffusers import StableDiffusionPipeline

    cls_name = scheduler_config.get("_class_name", "DDIMScheduler")
    scheduler_cls = getattr(diffusers, cls_name, diffusers.DDIMScheduler)
    scheduler = scheduler_cls.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_path(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=safe)  # type: ignore[attr-defined]
        _cast_weight_files(tmp, dtype)
        (tmp / "sdtool_training.json").write_text(json.dumps(metadata, ensure_ascii=False, indent=2) + "\n")
    return path


def _cast_weight_files(folder: Path, dtype: Any) -> None:
    """Cast every floating-point tensor in the folder's weight files to `dtype`, rewriting only what changes."""
    import torch
    from safetensors.torch import load_file, save_file

    for file in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(file)
        if all(t.dtype == dtype or not t.is_floating_point() for t in tensors.values()):
            continue
        cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(cast, file, metadata={"format": "pt"})
    for file in sorted(folder.rglob("*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        torch.save({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}, file)
