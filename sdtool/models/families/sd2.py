"""SD 2.x (512 and 768-v): OpenCLIP ViT-H/14 text encoder (`cond_stage_model.model.`, q/k/v fused into
`attn.in_proj_*`), 1024-wide cross-attention, linear projections in the U-Net's transformers, "!" padding.

SD2's text tower has 24 blocks; diffusers keeps 23 (SD2 conditions on the penultimate layer) and its single-file
loader skips `resblocks.23`. A 23-layer encoder therefore gets a 24th block on save, so that LDM-layout consumers
find the full tower; it is never run and diffusers drops it again on load.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sdtool.errors import ModelError
from sdtool.models import ldm_keys
from sdtool.models.families.base import ModelFamily

OPENCLIP_PREFIX = "cond_stage_model.model."
_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)

OPENCLIP_H_LAYERS = 24
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


class SD2Family(ModelFamily):
    name = "v2"
    title = "SD v2"
    text_encoder_prefixes = (OPENCLIP_PREFIX,)
    linear_projection = True
    kohya_v2 = True
    default_tokenizer = ("stabilityai/stable-diffusion-2", "tokenizer")
    architectures: ClassVar[dict[bool, str]] = {False: "stable-diffusion-v2-512", True: "stable-diffusion-v2-768-v"}
    config_names: ClassVar[dict[bool, str]] = {False: "sd2-512", True: "sd2-768-v"}
    resolutions: ClassVar[dict[bool, int]] = {False: 512, True: 768}

    def text_encoder_to_ldm(self, state_dict: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        return openclip_to_ldm(state_dict, extras)

    def ldm_extras(self, state_dict: Mapping[str, Any], config_dir: Path) -> dict[str, Any]:
        import json

        path = config_dir / "text_encoder" / "config.json"
        try:
            layers = int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path}: cannot read the text encoder's layer count ({exc})") from exc
        return openclip_extras(state_dict, layers)


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
    """v2: CLIPTextModel state_dict → OpenCLIP `cond_stage_model.model.*` with fused q/k/v `in_proj`.

    `extras` are OpenCLIP keys the diffusers model has no place for (`text_projection`, `logit_scale`, blocks past
    its last layer), carried over from a source file; missing ones are synthesized as kohya does.
    """
    import torch

    flat = ldm_keys.flat_text_keys(state_dict)
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out[OPENCLIP_PREFIX + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[OPENCLIP_PREFIX + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[OPENCLIP_PREFIX + "ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif match := _LAYER_KEY.fullmatch(key):
            layer, rest = int(match[1]), match[2]
            block = f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}."
            if qkv_match := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, qkv_match[2]), {})[qkv_match[1]] = value
                continue
            for src, dst in _OPENCLIP_LAYER:
                if rest.startswith(src):
                    out[block + dst + rest[len(src) :]] = value
                    break
            else:
                raise ModelError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        else:
            raise ModelError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"text encoder layer {layer} lacks some of its q/k/v {kind}s")
        out[f"{OPENCLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )

    extras = dict(extras or {})
    out.update({k: v for k, v in extras.items() if k.startswith(OPENCLIP_PREFIX) and k not in out})
    width = flat["embeddings.token_embedding.weight"].shape[1]
    dtype = flat["embeddings.token_embedding.weight"].dtype
    # OpenCLIP's text_projection is [width, embed_dim]; diffusers reads its first dimension as the width to split
    # in_proj by, so a synthesized one must be [width, width]. SD never uses it (it conditions on hidden states).
    out.setdefault(OPENCLIP_PREFIX + "text_projection", torch.eye(width, dtype=dtype))
    out.setdefault(OPENCLIP_PREFIX + "logit_scale", torch.tensor(math.log(1 / 0.07), dtype=dtype))
    layers = 1 + max((int(m[1]) for k in flat if (m := _LAYER_KEY.fullmatch(k))), default=-1)
    if layers == OPENCLIP_H_LAYERS - 1:
        last = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers - 1}."
        extra = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers}."
        for key in [k for k in out if k.startswith(last)]:
            out.setdefault(extra + key[len(last) :], out[key].clone())
    return out


def openclip_extras(ldm: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The OpenCLIP keys of an LDM file that a `num_layers` diffusers text encoder does not hold."""
    extras = {}
    for key, value in ldm.items():
        if not key.startswith(OPENCLIP_PREFIX):
            continue
        rest = key[len(OPENCLIP_PREFIX) :]
        match = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
        if rest in ("text_projection", "logit_scale") or (match and int(match[1]) >= num_layers):
            extras[key] = value
    return extras
