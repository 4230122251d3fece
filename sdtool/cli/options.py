"""Shared option aliases: a flag means the same on every command (CONTRACT §A)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _check_device(value: str) -> str:
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise typer.BadParameter("expected auto, cpu, cuda or cuda:N")


ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local diffusers/transformers folder, or single file."),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda or cuda:N.", callback=_check_device),
]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="Compute precision.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-j", min=0, help="Parallel image readers (default: one per CPU core)."),
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Walk sub-folders too.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs instead of keeping them.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any input was skipped.")]
ImageDirsArg = Annotated[
    list[Path],
    typer.Argument(help="Folders (or image files) to process.", show_default=False),
]
