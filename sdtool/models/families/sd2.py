"""SD 2.x (512 and 768-v): OpenCLIP ViT-H/14 text encoder (`cond_stage_model.model.`, q/k/v fused into
`attn.in_proj_*`), 1024-wide cross-attention, linear projections in the U-Net's transformers, "!" padding.

SD2's text tower has 24 blocks; diffusers keeps 23 (SD2 conditions on the penultimate layer) and its single-file
loader skips `resblocks.23`. A 23-layer encoder therefore gets a 24th block on save, so that LDM-layout consumers
find the full tower; it is never run and diffusers drops it again on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sdtool.models import ldm_keys
from sdtool.models.families import openclip
from sdtool.models.families.base import ModelFamily, TextPart

OPENCLIP_PREFIX = "cond_stage_model.model."

OPENCLIP_H_LAYERS = 24


class SD2Family(ModelFamily):
    name = "v2"
    title = "SD v2"
    text_encoder_prefixes = (OPENCLIP_PREFIX,)
    linear_projection = True
    kohya_v2 = True
    text_parts = (
        TextPart(
            "text_encoder",
            "tokenizer",
            "CLIPTextModel",
            ("stabilityai/stable-diffusion-2", "tokenizer"),
            "learning_rate_te",
        ),
    )
    architectures: ClassVar[dict[bool, str]] = {False: "stable-diffusion-v2-512", True: "stable-diffusion-v2-768-v"}
    config_names: ClassVar[dict[bool, str]] = {False: "sd2-512", True: "sd2-768-v"}
    resolutions: ClassVar[dict[bool, int]] = {False: 512, True: 768}

    def text_encoders_to_ldm(self, encoders: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        encoder = encoders.get("text_encoder")
        return openclip_to_ldm(encoder.state_dict(), extras) if encoder is not None else {}

    def ldm_extras(self, state_dict: Mapping[str, Any], config_dir: Path) -> dict[str, Any]:
        return openclip_extras(state_dict, openclip.saved_layer_count(config_dir, "text_encoder", "the text encoder"))


SD2 = SD2Family()


def detect_ldm(state_dict: Mapping[str, Any]) -> bool | None:
    """Whether LDM weights are SD2: an OpenCLIP text encoder, else the U-Net's cross-attention width (1024 vs 768)."""
    from sdtool.models.families.sd1 import CLIP_PREFIX

    if any(key.startswith(OPENCLIP_PREFIX) for key in state_dict):
        return True
    if any(key.startswith(CLIP_PREFIX) for key in state_dict):
        return False
    for key, value in state_dict.items():
        if key.startswith(ldm_keys.UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return {1024: True, 768: False}.get(int(value.shape[-1]))
    return None


def detect_configs(unet_config: Mapping[str, Any] | None, text_config: Mapping[str, Any] | None) -> bool | None:
    """Whether diffusers configs are SD2's: cross-attention width 1024, or an OpenCLIP-style text encoder (gelu)."""
    if unet_config is not None and unet_config.get("cross_attention_dim") == 1024:
        return True
    if text_config is not None:
        return bool(text_config.get("hidden_size") == 1024 or text_config.get("hidden_act") == "gelu")
    if unet_config is not None:
        return unet_config.get("cross_attention_dim") == 1024
    return None


def openclip_to_ldm(state_dict: Mapping[str, Any], extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SD2: CLIPTextModel state_dict → OpenCLIP `cond_stage_model.model.*` (24 blocks, see above)."""
    return openclip.openclip_to_ldm(state_dict, OPENCLIP_PREFIX, extras, full_layers=OPENCLIP_H_LAYERS)


def openclip_extras(ldm: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The OpenCLIP keys of an SD2 LDM file that a `num_layers` diffusers text encoder does not hold."""
    return openclip.openclip_extras(ldm, OPENCLIP_PREFIX, num_layers, keep_projection=True)
