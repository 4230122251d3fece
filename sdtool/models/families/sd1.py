"""SD 1.x: CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.text_model.`), 768-wide cross-attention, 1×1
convolution projections in the U-Net's transformers, 512² images, epsilon prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sdtool.models import ldm_keys
from sdtool.models.families.base import ModelFamily, TextPart

CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_TEXT_PREFIX = CLIP_PREFIX + "text_model."


class SD1Family(ModelFamily):
    name = "v1"
    title = "SD v1"
    text_encoder_prefixes = (CLIP_PREFIX,)
    linear_projection = False
    text_parts = (
        TextPart(
            "text_encoder", "tokenizer", "CLIPTextModel", ("openai/clip-vit-large-patch14", None), "learning_rate_te"
        ),
    )
    architectures: ClassVar[dict[bool, str]] = {
        False: "stable-diffusion-v1",
        True: "stable-diffusion-v1",
    }  # modelspec has no v1-v name
    config_names: ClassVar[dict[bool, str]] = {False: "sd15", True: "sd15"}
    resolutions: ClassVar[dict[bool, int]] = {False: 512, True: 512}

    def text_encoders_to_ldm(self, encoders: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        encoder = encoders.get("text_encoder")
        return clip_to_ldm(encoder.state_dict()) if encoder is not None else {}


SD1 = SD1Family()


def clip_to_ldm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel state_dict → `cond_stage_model.transformer.text_model.*`."""
    return {CLIP_TEXT_PREFIX + key: value for key, value in ldm_keys.flat_text_keys(state_dict).items()}


def normalize_ldm_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Read the older text-encoder layout without `text_model.` (as kohya does) and drop known artefacts."""
    old = ("embeddings.", "encoder.", "final_layer_norm.")
    out = {}
    for key, value in state_dict.items():
        if key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX) :].startswith(old):
            key = CLIP_TEXT_PREFIX + key[len(CLIP_PREFIX) :]
        if key.endswith("text_model.encoder.text_model.embeddings.position_ids"):
            continue  # a WD-1.4 artefact
        out[key] = value
    return out
