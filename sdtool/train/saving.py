"""Writing the trained model (CONTRACT §I): the one place the training recipe hands weights to the model I/O code.

Both forms are written by `sdtool.models.saving`: diffusers folders (with the training metadata in
`sdtool_training.json`) and single files (safetensors/ckpt in the LDM layout, with modelspec metadata). Saving in
`save_precision` casts copies, so the live models keep their fp32 master weights mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtool.models.families.base import ModelFamily


def save_trained_model(
    path: Path,
    fmt: str,
    *,
    unet: Any,
    text_parts: dict[str, Any],
    vae: Any,
    scheduler_config: dict[str, Any],
    family: ModelFamily,
    v_prediction: bool,
    precision: str | None,
    metadata: dict[str, str],
) -> Path:
    """Write the model as `fmt` (safetensors, ckpt, diffusers, diffusers_safetensors) at `path`, atomically.

    `text_parts` holds the family's text encoders and tokenizers by SDModel attribute (text_encoder, tokenizer,
    and text_encoder_2, tokenizer_2 for SDXL).
    """
    from sdtool.models.loading import SDModel
    from sdtool.models.saving import save_diffusers, save_single_file
    from sdtool.runtime import torch_dtype

    dtype = torch_dtype("fp32" if precision in (None, "float") else precision)
    model = SDModel(
        source=str(path),
        family=family,
        v_prediction=v_prediction,
        unet=unet,
        vae=vae,
        scheduler_config=scheduler_config,
        **text_parts,
    )
    if fmt.startswith("diffusers"):
        training = json.dumps(metadata, ensure_ascii=False, indent=2) + "\n"
        return save_diffusers(
            model,
            path,
            dtype=dtype,
            safe_serialization=fmt == "diffusers_safetensors",
            extra_files={"sdtool_training.json": training},
        )
    return save_single_file(
        model,
        path,
        family=family,
        v_prediction=v_prediction,
        dtype=dtype,
        metadata=metadata if fmt == "safetensors" else None,
        fmt=fmt,  # type: ignore[arg-type]
    )
