"""Read image sizes, assign aspect-ratio buckets and write the metadata JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import ImageDirsArg, JsonOpt, RecursiveOpt, StrictOpt, WorkersOpt

NAME = "bucket"
NO_ARGS_IS_HELP = True


def command(
    dirs: ImageDirsArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Metadata JSON (or .jsonl) to write.")],
    resolution: Annotated[
        str, typer.Option("--resolution", help="Training resolution: 512 or W,H (sets the max area).")
    ] = "512",
    min_bucket_reso: Annotated[int, typer.Option("--min-bucket-reso", min=1, help="Smallest bucket side.")] = 256,
    max_bucket_reso: Annotated[int, typer.Option("--max-bucket-reso", min=1, help="Largest bucket side.")] = 1024,
    bucket_reso_steps: Annotated[
        int, typer.Option("--bucket-reso-steps", min=8, help="Bucket sides are multiples of this.")
    ] = 64,
    no_upscale: Annotated[bool, typer.Option("--no-upscale", help="Never enlarge small images.")] = False,
    recursive: RecursiveOpt = False,
    caption_extension: Annotated[
        str, typer.Option("--caption-extension", help="Caption sidecar extension.")
    ] = ".caption",
    tags_extension: Annotated[str, typer.Option("--tags-extension", help="Tags sidecar extension.")] = ".txt",
    relative: Annotated[bool, typer.Option("--relative", help="Keys relative to DIR instead of absolute.")] = False,
    update: Annotated[
        bool, typer.Option("--update", help="Merge into an existing metadata file, keeping what it does not touch.")
    ] = False,
    json_lines: JsonOpt = False,
    workers: WorkersOpt = None,
    strict: StrictOpt = False,
) -> None:
    """Read image sizes, assign aspect-ratio buckets and write the metadata JSON."""
    from sdtool.errors import NotImplementedYetError

    raise NotImplementedYetError(NAME)
