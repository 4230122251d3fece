"""Diffusers → original LDM (CompVis / Stability) single-file key maps for the U-Net and the VAE.

diffusers converts LDM files to diffusers models (`from_single_file`), and sdtool loads single files through it. No
library writes the other direction, so it is written here once, table-driven: the tables are generated from a
model's config, so SD1.5, SD2, SDXL and the tiny test models (other widths, block and layer counts) all map the
same way.
Text encoders differ per model family and are mapped in `sdtool.models.families`.

LDM layout written:
- U-Net `model.diffusion_model.` (`input_blocks` / `middle_block` / `output_blocks`); transformer `proj_in` /
  `proj_out` are linear `[C, C]` weights where the config says `use_linear_projection`, 1×1 convs `[C, C, 1, 1]`
  otherwise.
- VAE `first_stage_model.`; the decoder's up blocks are numbered in reverse; the mid-block attention q/k/v/proj_out
  are 1×1 convs in LDM and linear layers in diffusers.
transformers 5 flattened `CLIPTextModel` (no `text_model.` in its state_dict); `flat_text_keys` accepts both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdtool.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

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
        # SDXL's micro-conditioning (`addition_embed_type = "text_time"`): label_emb in LDM files
        ("add_embedding.linear_1.", "label_emb.0.0.", ()),
        ("add_embedding.linear_2.", "label_emb.0.2.", ()),
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
            raise ModelError(f"{what} weight {key!r} has no place in the LDM layout (not a Stable Diffusion {what}?)")
    return out


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers U-Net state_dict → LDM keys; transformer proj_in/out are linear when the config says
    `use_linear_projection` (SD2) and 1×1 convs otherwise (SD1)."""
    linear = bool(config.get("use_linear_projection"))
    return fit_projections(_apply_table(state_dict, unet_table(config), UNET_PREFIX, "U-Net"), linear=linear)


def fit_projections(state_dict: Mapping[str, Any], *, linear: bool) -> dict[str, Any]:
    """LDM U-Net transformer proj_in/out as linear `[C, C]` weights or 1×1 convs `[C, C, 1, 1]`."""
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


def flat_text_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
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


def has_component(state_dict: Mapping[str, Any], component: str) -> bool:
    """Whether an LDM state dict holds this component's weights."""
    prefixes = {
        "unet": (UNET_PREFIX,),
        "vae": (VAE_PREFIX,),
    }[component]
    return any(key.startswith(prefixes) for key in state_dict)
