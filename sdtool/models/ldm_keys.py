"""Diffusers → original LDM (CompVis / Stability) single-file key maps, and the key facts sdtool reads from LDM files.

diffusers converts LDM files to diffusers models (`from_single_file`), and sdtool loads single files through it. No
library writes the other direction, so it is written here once, table-driven: the tables are generated from a
model's config, so SD1.5, SD2 and the tiny test models (other widths, block and layer counts) all map the same way.

LDM layout written:
- U-Net `model.diffusion_model.` (`input_blocks` / `middle_block` / `output_blocks`); SD2's transformer `proj_in` /
  `proj_out` are linear `[C, C]` weights, SD1's are 1×1 convs `[C, C, 1, 1]`.
- VAE `first_stage_model.`; the decoder's up blocks are numbered in reverse; the mid-block attention q/k/v/proj_out
  are 1×1 convs in LDM and linear layers in diffusers.
- v1 text encoder `cond_stage_model.transformer.text_model.` (a copy of CLIPTextModel's keys).
- v2 text encoder, OpenCLIP `cond_stage_model.model.` with q/k/v fused into `attn.in_proj_*`.
transformers 5 flattened `CLIPTextModel` (no `text_model.` in its state_dict); both layouts are accepted here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sdtool.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_TEXT_PREFIX = CLIP_PREFIX + "text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."

# (diffusers name, LDM name) of the sub-modules inside one block; matched at the start of the key's remainder.
_UNET_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)

# SD2's OpenCLIP-H text tower has 24 blocks; diffusers keeps 23 (SD2 uses the penultimate layer) and its single-file
# loader skips exactly `resblocks.23`. A 23-layer encoder therefore gets a 24th block on save so that LDM-layout
# consumers find the full tower; it is never run (penultimate layer) and diffusers drops it again on load.
OPENCLIP_H_LAYERS = 24

Table = list[tuple[str, str, tuple[tuple[str, str], ...]]]


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ModelError(f"layers_per_block={layers!r} per block is not an SD layout; cannot write an LDM file")
    return layers


def unet_table(config: Mapping[str, Any]) -> Table:
    """Prefix table diffusers U-Net → LDM `model.diffusion_model.` for this config's block and layer counts."""
    n = len(config["block_out_channels"])
    per = _layers_per_block(config)
    rows: Table = [
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(n):
        for j in range(per):
            ldm = (per + 1) * i + j + 1  # input block 0 is conv_in; each level adds `per` layers + a downsampler
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0.", _UNET_RESNET))
            rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1.", ()))
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op.", ()))
        up_has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            ldm = (per + 1) * i + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0.", _UNET_RESNET))
            rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1.", ()))
        if i < n - 1:
            # The upsampler follows the last layer's resnet (and its attention, when the level has one).
            slot = 2 if up_has_attention else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{slot}.", ()))
    return rows


def vae_table(config: Mapping[str, Any]) -> Table:
    """Prefix table diffusers AutoencoderKL → LDM `first_stage_model.` (decoder up blocks reversed)."""
    n = len(config["block_out_channels"])
    per = _layers_per_block(config)
    rows: Table = [
        ("quant_conv.", "quant_conv.", ()),
        ("post_quant_conv.", "post_quant_conv.", ()),
    ]
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.conv_in.", f"{part}.conv_in.", ()),
            (f"{part}.conv_out.", f"{part}.conv_out.", ()),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for i in range(n):
        for j in range(per):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        if i < n - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()))
        up = n - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(per + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
        if i < n - 1:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", ()))
    return rows


def _apply_table(state_dict: Mapping[str, Any], table: Table, prefix: str, what: str) -> dict[str, Any]:
    rows = sorted(table, key=lambda row: len(row[0]), reverse=True)  # longest prefix first
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        for src, dst, inner in rows:
            if key.startswith(src):
                rest = key[len(src) :]
                for inner_src, inner_dst in inner:
                    if rest.startswith(inner_src):
                        rest = inner_dst + rest[len(inner_src) :]
                        break
                out[prefix + dst + rest] = value
                break
        else:
            raise ModelError(f"{what} weight {key!r} has no place in the LDM layout (not an SD1/SD2 {what}?)")
    return out


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any], *, v2: bool) -> dict[str, Any]:
    """diffusers U-Net state_dict → LDM keys; transformer proj_in/out become linear for v2 and 1×1 convs for v1."""
    return fit_projections(_apply_table(state_dict, unet_table(config), UNET_PREFIX, "U-Net"), linear=v2)


def fit_projections(state_dict: Mapping[str, Any], *, linear: bool) -> dict[str, Any]:
    """LDM U-Net transformer proj_in/out as linear `[C, C]` weights (SD2) or 1×1 convs `[C, C, 1, 1]` (SD1)."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith(("proj_in.weight", "proj_out.weight")):
            if linear and value.ndim == 4:
                out[key] = value[:, :, 0, 0]
            elif not linear and value.ndim == 2:
                out[key] = value[:, :, None, None]
    return out


def vae_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL state_dict → LDM keys; mid-block attention linears become 1×1 conv weights."""
    out = _apply_table(state_dict, vae_table(config), VAE_PREFIX, "VAE")
    for key, value in out.items():
        attention = ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        if attention and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _flat_text_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel keys without the `text_model.` level (transformers ≥ 5 has none, 4.x had it)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue  # a buffer (index range), not a weight
        if not key.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            raise ModelError(f"text encoder weight {key!r} is not part of a CLIP text model")
        out[key] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """v1: CLIPTextModel state_dict → `cond_stage_model.transformer.text_model.*`."""
    return {CLIP_TEXT_PREFIX + key: value for key, value in _flat_text_keys(state_dict).items()}


_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def openclip_to_ldm(state_dict: Mapping[str, Any], extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """v2: CLIPTextModel state_dict → OpenCLIP `cond_stage_model.model.*` with fused q/k/v `in_proj`.

    `extras` are OpenCLIP keys the diffusers model has no place for (`text_projection`, `logit_scale`, blocks past
    its last layer), carried over from a source file; missing ones are synthesized as kohya does.
    """
    import torch

    flat = _flat_text_keys(state_dict)
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


def normalize_ldm_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Read the older v1 text-encoder layout without `text_model.` (as kohya does) and drop known artefacts."""
    old = ("embeddings.", "encoder.", "final_layer_norm.")
    out = {}
    for key, value in state_dict.items():
        if key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX) :].startswith(old):
            key = CLIP_TEXT_PREFIX + key[len(CLIP_PREFIX) :]
        if key.endswith("text_model.encoder.text_model.embeddings.position_ids"):
            continue  # a WD-1.4 artefact
        out[key] = value
    return out


def detect_v2_ldm(state_dict: Mapping[str, Any]) -> bool | None:
    """v2 from LDM weights: an OpenCLIP text encoder, else the U-Net's cross-attention width (1024 vs 768)."""
    if any(key.startswith(OPENCLIP_PREFIX) for key in state_dict):
        return True
    if any(key.startswith(CLIP_PREFIX) for key in state_dict):
        return False
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return {1024: True, 768: False}.get(int(value.shape[-1]))
    return None


def has_component(state_dict: Mapping[str, Any], component: str) -> bool:
    """Whether an LDM state dict holds this component's weights."""
    prefixes = {
        "unet": (UNET_PREFIX,),
        "vae": (VAE_PREFIX,),
        "text_encoder": (CLIP_PREFIX, OPENCLIP_PREFIX),
    }[component]
    return any(key.startswith(prefixes) for key in state_dict)
