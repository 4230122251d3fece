"""Load a VAE on its own (`--vae`, cache, sampling with cached latents): a VAE-only diffusers folder, the `vae/` of
a model folder or hub id, or a single file (a VAE alone, LDM or diffusers keys, or a full LDM checkpoint) whose
config comes from a folder or is read off the weights' shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtool.errors import ModelError
from sdtool.models.loading import _conversion_errors, _first_line
from sdtool.runtime import quiet_third_party


def load_vae(
    source: str | Path, *, dtype: Any = None, allow_pickle: bool = False, config: str | Path | None = None
) -> Any:
    """A VAE from a VAE-only diffusers folder, the `vae/` of a model folder or hub id, or a single file.

    Single files may be a VAE alone (LDM or diffusers keys) or a full LDM checkpoint; their config comes from
    `config` (a diffusers folder or a VAE folder) or is read off the weights' shapes.
    """
    from sdtool.models import hub

    quiet_third_party()
    src = str(source)
    path = Path(src)
    local = hub.local_model(src, what="the VAE", folders={"": False, "vae": True}) if hub.is_hub_id(src) else src
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    if path.is_file():
        return _load_vae_file(path, dtype, allow_pickle, config)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(src, **kwargs)
        return AutoencoderKL.from_pretrained(str(local), subfolder="vae", **kwargs)
    except OSError as exc:
        raise ModelError(f"{src}: cannot load a VAE ({exc})") from exc


def _load_vae_file(path: Path, dtype: Any, allow_pickle: bool, config: str | Path | None) -> Any:
    from diffusers import AutoencoderKL

    from sdtool.models import ldm_keys
    from sdtool.models.checkpoint import read_checkpoint

    state_dict, _ = read_checkpoint(path, allow_pickle=allow_pickle)
    if ldm_keys.has_component(state_dict, "vae"):  # a full checkpoint: keep only its VAE
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(ldm_keys.VAE_PREFIX)}
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        cfg = Path(config)
        kwargs.update(config=str(cfg), subfolder=None if (cfg / "config.json").is_file() else "vae")
    else:
        kwargs["original_config"] = _vae_original_config(path, state_dict)
    conversion_errors = _conversion_errors()
    try:
        vae = AutoencoderKL.from_single_file(state_dict, **kwargs)
    except conversion_errors as exc:
        raise ModelError(f"{path}: cannot load a VAE from it ({_first_line(exc)})") from exc
    missing = [n for n, p in vae.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{path}: not a complete VAE ({len(missing)} weights missing, e.g. {missing[0]})")
    return vae


def _vae_original_config(path: Path, state_dict: dict[str, Any]) -> dict[str, Any]:
    """An LDM-style VAE config read off the weights (LDM or diffusers keys), for diffusers' `original_config=`."""
    import re

    keys = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in state_dict.items()}
    ldm = "encoder.down.0.block.0.conv1.weight" in keys
    level = r"encoder\.down\.(\d+)\.block\.(\d+)\." if ldm else r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."
    found = [(int(m[1]), int(m[2])) for k in keys if (m := re.match(level, k))]
    try:
        if not found:
            raise KeyError("encoder blocks")
        levels = 1 + max(i for i, _ in found)
        layers = 1 + max(j for _, j in found)

        def width(i: int) -> int:
            name = f"encoder.down.{i}.block.0" if ldm else f"encoder.down_blocks.{i}.resnets.0"
            return int(keys[f"{name}.conv1.weight"].shape[0])

        ch = width(0)
        ddconfig = {
            "ch": ch,
            "ch_mult": [width(i) // ch for i in range(levels)],
            "num_res_blocks": layers,
            "z_channels": int(keys["post_quant_conv.weight"].shape[0]),
            "in_channels": int(keys["encoder.conv_in.weight"].shape[1]),
            "out_ch": int(keys["decoder.conv_out.weight"].shape[0]),
            "resolution": 256,
        }
    except KeyError as exc:
        raise ModelError(f"{path}: not a VAE (missing {exc})", hint="pass the VAE's diffusers config folder") from exc
    return {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
