"""Convert a checkpoint between single-file (.safetensors/.ckpt) and diffusers folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import ModelSourceArg, OverwriteOpt, Precision, flag

NAME = "convert"


class TargetFormat(str, Enum):
    diffusers = "diffusers"
    safetensors = "safetensors"
    ckpt = "ckpt"


class ModelType(str, Enum):
    auto = "auto"
    v1 = "v1"
    v2 = "v2"
    sdxl = "sdxl"


class Prediction(str, Enum):
    auto = "auto"
    epsilon = "epsilon"
    v = "v"


def command(
    src: ModelSourceArg,
    dst: Annotated[
        Path,
        typer.Argument(
            help="Output file (.safetensors, .ckpt) or folder (diffusers).", metavar="DST", show_default=False
        ),
    ],
    to: Annotated[
        TargetFormat | None, typer.Option("--to", help="Output format (default: from DST's extension).")
    ] = None,
    precision: Annotated[
        Precision | None, typer.Option("--precision", help="Store weights in this precision (default: as SRC).")
    ] = None,
    model_type: Annotated[ModelType, typer.Option("--model-type", help="SD v1, v2 or SDXL (default: detect).")] = (
        ModelType.auto
    ),
    prediction: Annotated[
        Prediction, typer.Option("--prediction", help="epsilon or v (default: detect).")
    ] = Prediction.auto,
    vae: Annotated[
        str | None, typer.Option("--vae", help="Replace the VAE with this one (default: keep SRC's).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Diffusers folder to take configs and tokenizer from (default: the built-in configs).",
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, flag("--allow-pickle", help="Allow .ckpt files that need full unpickling (unsafe).")
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert a checkpoint between single-file (.safetensors/.ckpt) and diffusers folder."""
    from sdtool.models.convert import convert_checkpoint

    result = convert_checkpoint(
        src,
        dst,
        to=to.value if to is not None else None,
        precision=precision.value if precision is not None else None,
        model_type=model_type.value,
        prediction=prediction.value,
        vae=vae,
        config=config,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
    )
    typer.echo(str(result.path))
