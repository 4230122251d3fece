"""Save SD models: single files in the original LDM layout (with modelspec metadata) and diffusers folders.

The API training and `sdtool convert` share:
- `save_single_file(model_or_components, path, family=…, v_prediction=…, dtype=…, metadata=…, fmt=…)`
- `save_diffusers(model, path, dtype=…, safe_serialization=…)`
- `modelspec_metadata(family=…, v_prediction=…, title=…, …)` for the safetensors header.
The model family (`sdtool.models.families`) says how its text encoder is laid out and how modelspec names it.
Every write goes through `sdtool.fsutil.atomic_path`; the models passed in are never modified (casts work on copies).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from sdtool.errors import ModelError, UsageError
from sdtool.fsutil import atomic_path
from sdtool.models.families.base import ModelFamily
from sdtool.models.loading import SDModel
from sdtool.models.torch_file import save_torch_file

SingleFileFormat = Literal["safetensors", "ckpt"]
# The single-file format each writable extension stands for.
SINGLE_FILE_EXTENSIONS: dict[str, SingleFileFormat] = {
    ".safetensors": "safetensors",
    ".ckpt": "ckpt",
    ".pt": "ckpt",
    ".pth": "ckpt",
}
# A diffusers folder names its pipeline in model_index.json: the one file that marks a folder as a model that
# `save_diffusers` may replace (any other non-empty folder is refused, see sdtool.fsutil.replace_folder).
DIFFUSERS_MARKERS = ("model_index.json",)
MODELSPEC_VERSION = "1.0.1"
# kohya's sd-scripts writes this for SD1/SD2 too; modelspec readers key on it.
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def modelspec_metadata(
    *,
    family: ModelFamily,
    v_prediction: bool,
    title: str,
    resolution: tuple[int, int] | int | None = None,
    encoder_layer: int | None = None,
    date: datetime.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """modelspec 1.0.1 metadata for a single file of `family` (all values strings, as safetensors requires)."""
    when = (date or datetime.datetime.now()).astimezone().replace(microsecond=0)
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.architecture(v_prediction),
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": when.isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if resolution is not None:
        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        meta["modelspec.resolution"] = f"{width}x{height}"
    if encoder_layer is not None:
        meta["modelspec.encoder_layer"] = str(encoder_layer)
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else str(value)
    return meta


def native_resolution(unet: Any, vae: Any = None) -> int | None:
    """The image size the U-Net was configured for: sample_size × the VAE's downscale factor."""
    sample = getattr(unet.config, "sample_size", None) if unet is not None else None
    if not isinstance(sample, int):
        return None
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return sample * factor


def ldm_state_dict(
    unet: Any,
    vae: Any,
    text_encoders: Mapping[str, Any],
    *,
    family: ModelFamily,
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The LDM single-file state dict of the given diffusers components (any may be None or missing);
    `text_encoders` maps SDModel attribute names (text_encoder, text_encoder_2) to modules."""
    from sdtool.models import ldm_keys

    out: dict[str, Any] = {}
    if unet is not None:
        out.update(ldm_keys.unet_to_ldm(unet.state_dict(), unet.config))
    if vae is not None:
        out.update(ldm_keys.vae_to_ldm(vae.state_dict(), vae.config))
    out.update(family.text_encoders_to_ldm({k: v for k, v in text_encoders.items() if v is not None}, extras))
    return out


def _finalize(state_dict: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Cast floats to `dtype` and give every tensor its own contiguous storage (safetensors refuses shared ones)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def single_file_format(path: str | Path, fmt: str | None = None) -> SingleFileFormat:
    """`fmt` if given, else from the extension (.safetensors, .ckpt/.pt)."""
    if fmt is None:
        suffix = Path(path).suffix.lower()
        fmt = SINGLE_FILE_EXTENSIONS.get(suffix)
        if fmt is None:
            raise UsageError(f"{path}: cannot tell the file format from {suffix or 'no extension'!r}")
    if fmt not in ("safetensors", "ckpt"):
        raise UsageError(f"unknown single-file format {fmt!r}; use safetensors or ckpt")
    return fmt  # type: ignore[return-value]


def save_single_file(
    model_or_components: SDModel | Mapping[str, Any],
    path: str | Path,
    *,
    family: ModelFamily,
    v_prediction: bool,
    dtype: Any = None,
    metadata: Mapping[str, str] | None = None,
    fmt: SingleFileFormat | None = None,
    ckpt_extra: Mapping[str, int] | None = None,
    zero_terminal_snr: bool | None = None,
) -> Path:
    """Write an LDM-layout single file atomically and return its path.

    `model_or_components` is an `SDModel` or a mapping with `unet`, `vae`, the family's text encoders
    (`text_encoder`, and `text_encoder_2` for SDXL; any may be missing,
    e.g. to write a U-Net-only file) and optionally `ldm_extras`. `dtype` casts every float tensor (None keeps
    each tensor's own). `metadata` goes into the safetensors header (build it with `modelspec_metadata`); a `.ckpt`
    is a plain `{"state_dict": …}` (plus `ckpt_extra` ints such as epoch / global_step), loadable with
    `torch.load(weights_only=True)` and by A1111's safe loader (`sdtool.models.torch_file`). Families that mark
    v-prediction in the weights (SDXL, as ComfyUI reads it) get the marker keys; `zero_terminal_snr` None takes it
    from an SDModel's scheduler config.
    """
    path = Path(path)
    kind = single_file_format(path, fmt)
    encoder_names = [part.encoder for part in family.text_parts]
    if isinstance(model_or_components, SDModel):
        parts: Mapping[str, Any] = {
            "unet": model_or_components.unet,
            "vae": model_or_components.vae,
            **{name: getattr(model_or_components, name) for name in encoder_names},
            "ldm_extras": model_or_components.ldm_extras,
        }
        if zero_terminal_snr is None:
            zero_terminal_snr = bool(model_or_components.scheduler_config.get("rescale_betas_zero_snr"))
    else:
        parts = model_or_components
    unknown = set(parts) - {"unet", "vae", "ldm_extras", *encoder_names}
    if unknown:
        raise ModelError(f"cannot save components {sorted(unknown)} into a {family.title} single file")
    encoders = {name: parts.get(name) for name in encoder_names}
    state_dict = ldm_state_dict(
        parts.get("unet"), parts.get("vae"), encoders, family=family, extras=parts.get("ldm_extras")
    )
    if not state_dict:
        raise ModelError("nothing to save: no U-Net, VAE or text encoder given")
    state_dict.update(family.ldm_markers(v_prediction, bool(zero_terminal_snr)))
    state_dict = _finalize(state_dict, dtype)
    if kind == "ckpt":
        payload: dict[str, Any] = {"state_dict": state_dict}
        payload.update({k: int(v) for k, v in (ckpt_extra or {}).items()})
        return save_torch_file(payload, path)
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=dict(metadata or {}))
    return path


def _float_dtypes(module: Any) -> set[Any]:
    return {p.dtype for p in module.state_dict().values() if p.is_floating_point()}


def _cast_copy(module: Any, dtype: Any) -> Any:
    """`module` itself when already in `dtype`, else a copy in `dtype` (built on meta, so no double fp32 copy)."""
    if module is None or dtype is None or _float_dtypes(module) <= {dtype}:
        return module
    from accelerate import init_empty_weights

    with init_empty_weights():
        clone = (
            type(module).from_config(module.config) if hasattr(module, "from_config") else type(module)(module.config)
        )
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    clone.load_state_dict(state, assign=True, strict=True)
    return clone


def save_diffusers(
    model: SDModel,
    path: str | Path,
    dtype: Any = None,
    safe_serialization: bool = True,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers pipeline folder of the model's family atomically (scheduler with its prediction type).

    `extra_files` are text files written into the folder beside the components (e.g. training metadata).
    """
    import diffusers

    path = Path(path)
    family = model.family
    needed = ["unet", "vae"] + [name for part in family.text_parts for name in (part.encoder, part.tokenizer)]
    missing = [name for name in needed if getattr(model, name) is None]
    if missing:
        raise ModelError(f"cannot write a diffusers folder without {', '.join(missing)}")
    scheduler_config = dict(model.scheduler_config)
    class_name = scheduler_config.get("_class_name", "DDIMScheduler")
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None:
        raise ModelError(f"unknown scheduler class {class_name!r} in the model's scheduler config")
    scheduler_config["prediction_type"] = model.prediction_type
    components: dict[str, Any] = {
        "vae": _cast_copy(model.vae, dtype),
        "unet": _cast_copy(model.unet, dtype),
        "scheduler": scheduler_cls.from_config(scheduler_config),
    }
    for part in family.text_parts:
        components[part.encoder] = _cast_copy(getattr(model, part.encoder), dtype)
        components[part.tokenizer] = getattr(model, part.tokenizer)
    pipe = getattr(diffusers, family.pipeline_class)(**components, **family.pipeline_options)
    with atomic_path(path, folder=True, replaces=DIFFUSERS_MARKERS) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=safe_serialization)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return path
