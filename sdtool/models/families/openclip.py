"""OpenCLIP text towers in LDM single files (SD2's `cond_stage_model.model.`, SDXL's `conditioner.embedders.1.model.`):
q/k/v fused into `attn.in_proj_*`, `ln_1`/`ln_2`/`mlp.c_fc`/`mlp.c_proj` names, `positional_embedding`, `ln_final`,
and `text_projection` stored as OpenCLIP's `[width, embed_dim]` matrix, the transpose of transformers'
`text_projection.weight` (diffusers transposes it on load, and so does sdtool on save).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdtool.errors import ModelError
from sdtool.models import ldm_keys

_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def openclip_to_ldm(
    state_dict: Mapping[str, Any],
    prefix: str,
    extras: Mapping[str, Any] | None = None,
    *,
    full_layers: int | None = None,
) -> dict[str, Any]:
    """A transformers CLIP text model's state_dict → OpenCLIP keys under `prefix`, q/k/v fused into `in_proj`.

    `extras` are OpenCLIP keys the diffusers model has no place for (`logit_scale`, blocks past its last layer,
    SD2's unused `text_projection`), carried over from a source file; missing ones are synthesized as kohya does.
    `full_layers`: a tower one block short of it gets a copy of its last block (SD2, see sd2.py).
    """
    import torch

    state = dict(state_dict)
    projection = state.pop("text_projection.weight", None)
    flat = ldm_keys.flat_text_keys(state)
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif match := _LAYER_KEY.fullmatch(key):
            layer, rest = int(match[1]), match[2]
            block = f"{prefix}transformer.resblocks.{layer}."
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
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    if projection is not None:
        out[prefix + "text_projection"] = projection.T.contiguous()

    out.update({k: v for k, v in (extras or {}).items() if k.startswith(prefix) and k not in out})
    width = flat["embeddings.token_embedding.weight"].shape[1]
    dtype = flat["embeddings.token_embedding.weight"].dtype
    # OpenCLIP's text_projection is [width, embed_dim]; diffusers reads its first dimension as the width to split
    # in_proj by, so a synthesized one must be [width, width]. SD2 never uses it (it conditions on hidden states).
    out.setdefault(prefix + "text_projection", torch.eye(width, dtype=dtype))
    out.setdefault(prefix + "logit_scale", torch.tensor(math.log(1 / 0.07), dtype=dtype))
    layers = 1 + max((int(m[1]) for k in flat if (m := _LAYER_KEY.fullmatch(k))), default=-1)
    if full_layers is not None and layers == full_layers - 1:
        last = f"{prefix}transformer.resblocks.{layers - 1}."
        extra = f"{prefix}transformer.resblocks.{layers}."
        for key in [k for k in out if k.startswith(last)]:
            out.setdefault(extra + key[len(last) :], out[key].clone())
    return out


def saved_layer_count(config_dir: Path, folder: str, what: str) -> int:
    """`num_hidden_layers` of the text encoder saved in `config_dir/folder`, which the LDM extras need; ModelError
    naming the file when it cannot be read."""
    path = config_dir / folder / "config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot read {what}'s layer count ({exc})") from exc


def openclip_extras(ldm: Mapping[str, Any], prefix: str, num_layers: int, *, keep_projection: bool) -> dict[str, Any]:
    """The OpenCLIP keys under `prefix` of an LDM file that a `num_layers` diffusers text encoder does not hold
    (`logit_scale`, blocks past its last layer, and `text_projection` unless the model has one of its own)."""
    extras = {}
    names = ("text_projection", "logit_scale") if keep_projection else ("logit_scale",)
    for key, value in ldm.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        match = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
        if rest in names or (match and int(match[1]) >= num_layers):
            extras[key] = value
    return extras
