"""Encode bucketed images with the VAE and store their latents on disk."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    Precision,
    PrecisionOpt,
    StrictOpt,
    WorkersOpt,
)

NAME = "cache"
NO_ARGS_IS_HELP = True


class CacheFormat(str, Enum):
    sdtool = "sdtool"
    kohya = "kohya"


class Interpolation(str, Enum):
    lanczos = "lanczos"
    bicubic = "bicubic"
    bilinear = "bilinear"
    box = "box"
    nearest = "nearest"
    area = "area"


def command(
    metadata: Annotated[Path, typer.Argument(help="Metadata JSON written by 'sdtool bucket'.", show_default=False)],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model whose VAE encodes (hub id, folder or single file).")
    ] = None,
    image_dir: Annotated[
        Path | None, typer.Option("--image-dir", help="Folder that relative metadata keys resolve against.")
    ] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="A separate VAE (folder, hub id or file).")] = None,
    batch_size: BatchSizeOpt = 4,
    flip_aug: Annotated[bool, typer.Option("--flip-aug", help="Also encode each image mirrored.")] = False,
    precision: PrecisionOpt = Precision.fp32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    resize_interpolation: Annotated[
        Interpolation, typer.Option("--resize-interpolation", help="Resampling filter for the resize.")
    ] = Interpolation.lanczos,
    format: Annotated[
        CacheFormat, typer.Option("--format", help="sdtool (mean+std, fingerprinted) or kohya npz.")
    ] = CacheFormat.sdtool,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Where sdtool-format entries go (default: beside META).")
    ] = None,
    overwrite: OverwriteOpt = False,
    status: Annotated[bool, typer.Option("--status", help="Report ok/missing/stale without encoding.")] = False,
    json_lines: JsonOpt = False,
    strict: StrictOpt = False,
) -> None:
    """Encode bucketed images with the VAE and store their latents on disk."""
    from sdtool.errors import NotImplementedYetError

    raise NotImplementedYetError(NAME)
