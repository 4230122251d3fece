"""`sdtool convert`: single-file checkpoint (.safetensors / .ckpt) ⇄ diffusers folder (CONTRACT §J)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdtool.console import info
from sdtool.errors import SdtoolError, UsageError
from sdtool.models.families.base import ModelFamily
from sdtool.models.loading import ModelTypeArg, PredictionArg
from sdtool.models.saving import SINGLE_FILE_EXTENSIONS

TargetFormat = Literal["diffusers", "safetensors", "ckpt"]
# modelspec keys that describe the written file itself, so a conversion recomputes them instead of copying them.
_RECOMPUTED = (
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.prediction_type",
)


@dataclass
class ConvertResult:
    """What `convert_checkpoint` wrote."""

    path: Path
    format: TargetFormat
    family: ModelFamily
    v_prediction: bool
    dtype: Any


def target_format(dst: str | Path, to: str | None = None) -> TargetFormat:
    """DST's format: `to` if given (it must agree with a checkpoint extension), else the extension; none → diffusers."""
    suffix = Path(dst).suffix.lower()
    by_extension = SINGLE_FILE_EXTENSIONS.get(suffix)
    if to is None:
        if by_extension is not None:
            return by_extension
        if suffix and suffix[1:].isalpha():
            raise UsageError(
                f"{dst}: unknown output extension {suffix!r}",
                hint="use .safetensors or .ckpt, no extension for a diffusers folder, or --to",
            )
        return "diffusers"
    if to not in ("diffusers", "safetensors", "ckpt"):
        raise UsageError(f"--to {to}: expected diffusers, safetensors or ckpt")
    if by_extension is not None and by_extension != to:
        raise UsageError(f"--to {to} contradicts the extension of {dst} ({suffix})")
    return to  # type: ignore[return-value]


def _check_destination(src: str, dst: Path, fmt: TargetFormat, overwrite: bool) -> None:
    """DST must not be or hold SRC, and only a model folder sdtool can recognise is ever replaced."""
    from sdtool.fsutil import folder_is_replaceable, not_replaceable_error
    from sdtool.models.saving import DIFFUSERS_MARKERS

    source = Path(src)
    if source.exists() or source.is_symlink():
        if source.resolve() == dst.resolve():
            raise UsageError(f"{dst}: the output would replace the input", hint="choose another DST")
        if dst.resolve() in source.resolve().parents:
            raise UsageError(
                f"{dst}: the output folder holds the input {src}, which replacing it would delete",
                hint="choose a DST outside the input's folder",
            )
    if not dst.exists() and not dst.is_symlink():
        return
    if fmt == "diffusers" and dst.is_dir() and not folder_is_replaceable(dst, DIFFUSERS_MARKERS):
        raise not_replaceable_error(dst, DIFFUSERS_MARKERS)
    if not overwrite:
        raise SdtoolError(f"{dst} already exists", hint="pass --overwrite to replace it")
    if fmt == "diffusers" and not dst.is_dir():
        raise UsageError(f"{dst} is a file; a diffusers folder cannot replace it", hint="remove it or pick another DST")
    if fmt != "diffusers" and dst.is_dir():
        raise UsageError(f"{dst} is a folder; a single file cannot replace it", hint="remove it or pick another DST")


def conversion_metadata(model: Any, dst: Path) -> dict[str, str]:
    """modelspec metadata for a converted file: recomputed architecture/prediction, the rest kept from the source."""
    from sdtool.models.saving import modelspec_metadata, native_resolution

    meta = modelspec_metadata(
        family=model.family,
        v_prediction=model.v_prediction,
        title=dst.stem,
        resolution=native_resolution(model.unet, model.vae),
    )
    for key, value in model.source_metadata.items():
        if key not in _RECOMPUTED and key != "format":
            meta[key] = value
    return meta


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    to: str | None = None,
    precision: str | None = None,
    model_type: ModelTypeArg = "auto",
    prediction: PredictionArg = "auto",
    vae: str | Path | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert SRC (single file, diffusers folder or hub id) to DST; precision None keeps the source's precision."""
    from sdtool.models.loading import load_model
    from sdtool.models.saving import save_diffusers, save_single_file
    from sdtool.models.vae import load_vae
    from sdtool.runtime import torch_dtype

    src = str(src)
    dst = Path(dst)
    fmt = target_format(dst, to)
    from sdtool.fsutil import clean_leftovers_of

    clean_leftovers_of(dst)  # what an interrupted conversion to DST left (see sdtool.fsutil)
    _check_destination(src, dst, fmt, overwrite)
    dtype = torch_dtype(precision) if precision is not None else None

    components = ("unet", "text_encoder") + (() if vae is not None else ("vae",))
    if fmt == "diffusers":
        components += ("tokenizer",)
    model = load_model(
        src,
        config=config,
        model_type=model_type,
        prediction=prediction,
        allow_pickle=allow_pickle,
        components=components,
    )
    if vae is not None:
        model.vae = load_vae(vae, allow_pickle=allow_pickle)
    out_dtype = dtype if dtype is not None else model.source_dtype
    if fmt == "diffusers":
        save_diffusers(model, dst, dtype=out_dtype)
    else:
        metadata = conversion_metadata(model, dst) if fmt == "safetensors" else None
        save_single_file(
            model,
            dst,
            family=model.family,
            v_prediction=model.v_prediction,
            dtype=out_dtype,
            metadata=metadata,
            fmt=fmt,
        )
    info(
        f"converted {src} ({model.family.title}, {model.prediction_type}) → {dst} "
        f"({fmt}, {_precision_name(out_dtype)}{'' if dtype is not None else ', as the source'})"
    )
    return ConvertResult(path=dst, format=fmt, family=model.family, v_prediction=model.v_prediction, dtype=out_dtype)


def _precision_name(dtype: Any) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", None: "fp32"}.get(dtype, str(dtype))
